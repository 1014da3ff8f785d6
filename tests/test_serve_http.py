"""``grefine serve --tiny`` as apps meet it: OpenAI's own client, raw HTTP, every error's shape.

A real server process on 127.0.0.1 and real clients; the tiny random-weight models stand in for
real weights (which cannot be downloaded here), so scores mean nothing, but every byte path is real.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from grefine_hooks import QualityLog

from serving import ServerProcess, metric

MAX_STEPS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-http")
    with ServerProcess(directory, "--max-queue", "8", "--max-side", "256", "--max-steps", str(MAX_STEPS),
                       "--timeout", "120") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _decode(b64_json: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def test_openai_client_gets_typed_images_whose_records_are_logged(server, client):
    raw = client.images.with_raw_response.generate(
        prompt="a red book on a wooden table", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 2, "negative_prompt": "blurry"},
    )
    response = raw.parse()
    assert isinstance(response, openai.types.ImagesResponse) and len(response.data) == 2
    request_id = raw.headers["x-request-id"]
    logged = {record.record_id: record for record in QualityLog(server.log).read()}
    for k, item in enumerate(response.data):
        image = _decode(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)
        summary = item.model_extra["grefine"]
        record = logged[summary["record_id"]]  # in the log before the response was sent
        assert record.request_id == summary["request_id"] == request_id
        assert record.seed == summary["seed"] == 11 + k and record.image_index == k
        assert record.prompt == "a red book on a wooden table" and record.negative_prompt == "blurry"
        assert record.replica and record.decision == summary["decision"] and record.arm == summary["arm"]
        assert summary["p"] == pytest.approx(record.p_before) and 0.0 <= summary["a"] <= 1.0
    assert response.size == "64x64" and response.output_format == "png"


def test_the_same_seed_draws_the_same_image(client):
    first, second = (
        client.images.generate(prompt="a cat", size="64x64", extra_body={"seed": 5, "grefine": {"refine": False}})
        for _ in range(2)
    )
    assert first.data[0].b64_json == second.data[0].b64_json
    assert first.data[0].model_extra["grefine"]["reason"] == "scored only: refinement off for this call"


def test_url_responses_and_other_formats(server, client):
    response = client.images.generate(prompt="a dog", size="64x64", response_format="url", output_format="webp")
    url = response.data[0].url
    assert url.startswith(f"{server.url}/v1/images/files/")
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).format == "WEBP"
    jpeg = client.images.generate(prompt="a dog", size="64x64", output_format="jpeg", output_compression=80)
    assert _decode(jpeg.data[0].b64_json).format == "JPEG"
    missing = httpx.get(f"{server.url}/v1/images/files/nope.png", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_original_and_maps_are_returned_on_request(client):
    item = client.images.generate(
        prompt="a red cube", size="64x64", extra_body={"seed": 1, "grefine": {
            "return_original": True, "return_maps": True, "policy": {"p_threshold": 1.0, "a_threshold": 1.0,
                                                                      "guard": False}}},
    ).data[0]
    summary = item.model_extra["grefine"]
    assert summary["decision"] == "refined"
    assert summary["original_b64_json"] != item.b64_json  # the image before refinement differs
    assert {name: _decode(summary["maps"][name]).size for name in ("P", "A")} == {"P": (64, 64), "A": (64, 64)}


def test_models_health_readiness_and_metrics(server, client):
    assert [model.id for model in client.models.list().data] == ["tiny-sd15"]
    assert client.models.retrieve("tiny-sd15").owned_by == "grefine-hooks"
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["model"] == "tiny-sd15"
    before = httpx.get(f"{server.url}/metrics").text
    client.images.generate(prompt="a bird", size="64x64")
    after = httpx.get(f"{server.url}/metrics").text
    route = {"route": "/v1/images/generations", "status": "200"}
    assert metric(after, "grefine_http_requests_total", **route) == metric(before, "grefine_http_requests_total", **route) + 1
    assert metric(after, "grefine_p_count") == metric(before, "grefine_p_count") + 1
    assert metric(after, "grefine_queue_wait_seconds_count") > metric(before, "grefine_queue_wait_seconds_count")
    assert metric(after, "grefine_stage_seconds_count", stage="generate") >= 1
    assert metric(after, "grefine_queue_capacity") == 8
    assert 0.0 <= metric(after, "grefine_refine_rate") <= 1.0


OK = {"prompt": "a cat", "size": "64x64"}
# (body, expected status, the field named in error.param, error.code or None to not check it)
BAD_INPUTS = [
    ({**OK, "n": 0}, 400, "n", "invalid_value"),
    ({**OK, "n": 11}, 400, "n", "invalid_value"),
    ({**OK, "n": "2"}, 400, "n", None),
    ({**OK, "n": 1.5}, 400, "n", None),
    ({**OK, "size": "abc"}, 400, "size", "invalid_value"),
    ({**OK, "size": "60x64"}, 400, "size", "invalid_value"),  # not a multiple of 8
    ({**OK, "size": "4096x4096"}, 400, "size", "invalid_value"),  # beyond --max-side
    ({**OK, "size": "0x64"}, 400, "size", "invalid_value"),
    ({"size": "64x64"}, 400, "prompt", "missing_required_parameter"),
    ({**OK, "prompt": ""}, 400, "prompt", "invalid_value"),
    ({**OK, "prompt": "   \n"}, 400, "prompt", "invalid_value"),
    ({**OK, "prompt": 5}, 400, "prompt", None),
    ({**OK, "prompt": ["a cat"]}, 400, "prompt", None),
    ({**OK, "prompt": "x" * 10_001}, 400, "prompt", "invalid_value"),
    ({**OK, "promt": "typo"}, 400, "promt", "unknown_parameter"),
    ({**OK, "response_format": "gif"}, 400, "response_format", None),
    ({**OK, "output_format": "bmp"}, 400, "output_format", None),
    ({**OK, "output_format": "jpeg", "output_compression": 150}, 400, "output_compression", "invalid_value"),
    ({**OK, "output_compression": 50}, 400, "output_compression", "invalid_value"),  # png has none
    ({**OK, "seed": -1}, 400, "seed", "invalid_value"),
    ({**OK, "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_value"),
    ({**OK, "num_inference_steps": MAX_STEPS + 1}, 400, "num_inference_steps", "invalid_value"),
    ({**OK, "guidance_scale": "high"}, 400, "guidance_scale", None),
    ({**OK, "guidance_scale": -1}, 400, "guidance_scale", "invalid_value"),
    ({**OK, "style": "vivid"}, 400, "style", "unsupported_value"),
    ({**OK, "stream": True}, 400, "stream", "unsupported_value"),
    ({**OK, "grefine": {"policy": {"p_treshold": 0.3}}}, 400, "grefine.policy.p_treshold", "unknown_parameter"),
    ({**OK, "grefine": {"policy": {"p_threshold": 2}}}, 400, "grefine.policy.p_threshold", "invalid_value"),
    ({**OK, "grefine": {"policy": {"guard": "yes"}}}, 400, "grefine.policy.guard", "invalid_value"),
    ({**OK, "grefine": {"refine": "no"}}, 400, "grefine.refine", None),
    ({**OK, "grefine": {"colour": "red"}}, 400, "grefine.colour", "unknown_parameter"),
    ({**OK, "grefine": {"timeout": -1}}, 400, "grefine.timeout", "invalid_value"),
    ({**OK, "grefine": "refine"}, 400, "grefine", None),
    ({**OK, "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ([OK], 400, None, None),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_INPUTS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_openai_error_naming_the_field(server, body, status, param, code):
    response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if status == 400:
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"\xff\xfe", {}, 400, "invalid_json"),
        (b"", {}, 400, "invalid_json"),
        (b" " * ((1 << 20) + 1), {}, 413, "body_too_large"),
        (json.dumps(OK).encode(), {"x-request-id": "bad id with spaces"}, 400, "invalid_value"),
    ],
    ids=["malformed-json", "not-utf8", "empty-body", "too-large", "bad-request-id"],
)
def test_malformed_requests_get_openai_errors(server, content, headers, status, code):
    response = httpx.post(f"{server.url}/v1/images/generations", content=content,
                          headers={"content-type": "application/json", **headers}, timeout=60)
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_unknown_routes_and_methods_keep_the_error_shape(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"
    response = httpx.get(f"{server.url}/v1/images/generations")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_after_every_bad_input_the_worker_still_serves(client):
    # Runs after the tables above (file order): nothing a client sent stopped the worker.
    assert len(client.images.generate(prompt="a fox", size="64x64", n=1).data) == 1


def test_before_the_model_is_loaded_requests_get_503_and_readyz_says_loading(tmp_path):
    """A real uvicorn server on 127.0.0.1 in this process, over a service whose load waits."""
    import threading

    import uvicorn

    from grefine_hooks.loading import load_refined_pipeline
    from grefine_integrations.serve import ImageService, create_app

    from serving import free_port

    release = threading.Event()
    service = ImageService(lambda: release.wait(120) and load_refined_pipeline(tiny=True),
                           quality_log=tmp_path / "quality.jsonl")
    service.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "loading"
        response = httpx.post(f"{url}/v1/images/generations", json=OK, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "model_not_ready"
        bad = httpx.post(f"{url}/v1/images/generations", json={**OK, "n": 0}, timeout=30)
        assert bad.status_code == 400  # bad input is named even while loading
        release.set()
        assert service.wait_until_loaded(300)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.post(f"{url}/v1/images/generations", json=OK, timeout=120).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        service.close()


def test_users_feedback_on_an_image_reaches_the_quality_log(server, client):
    record_id = client.images.generate(prompt="a teddy bear", size="64x64").data[0].model_extra["grefine"]["record_id"]
    url = f"{server.url}/v1/quality/feedback"
    for score in ("up", 0.25):
        response = httpx.post(url, json={"record_id": record_id, "score": score, "comment": "nice"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["record_id"] == record_id and response.json()["object"] == "quality.feedback"
    assert [f.score for f in QualityLog(server.log).feedback([record_id])] == [1.0, 0.25]

    cases = [
        ({"record_id": "0" * 32, "score": "up"}, 404, "record_id", "record_not_found"),
        ({"record_id": record_id, "score": 2}, 400, "score", "invalid_value"),
        ({"record_id": record_id, "score": "meh"}, 400, "score", None),
        ({"score": "up"}, 400, "record_id", "missing_required_parameter"),
        ({"record_id": record_id, "score": "up", "stars": 5}, 400, "stars", "unknown_parameter"),
    ]
    for body, status, param, code in cases:
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
        if code is not None:
            assert response.json()["error"]["code"] == code
    assert len(QualityLog(server.log).feedback([record_id])) == 2  # refusals wrote nothing
