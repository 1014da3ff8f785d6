"""``grefine serve`` writing the fleet-wide log: a real PostgreSQL server behind a real service.

A replica answers apps while the database goes away and comes back: the images of the outage are
refused with OpenAI's error shape (their records kept), every record reaches the database exactly
once when it is back, and the database password appears in no response, metric or server output.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from grefine_hooks import QualityLog

from serving import SKIP_ALL, ServerProcess, metric


@pytest.fixture
def served(tmp_path, postgres_server):
    url = postgres_server.create_database()
    with ServerProcess(tmp_path, "--timeout", "120", policy=SKIP_ALL, log=url) as server:
        yield server, url


def _generate(client: openai.OpenAI, seed: int):
    return client.images.with_raw_response.generate(
        prompt="a red book on a table", n=2, size="64x64", extra_body={"seed": seed, "num_inference_steps": 2},
    )


def test_served_records_survive_a_database_outage_and_no_output_shows_the_password(served, postgres_server):
    server, url = served
    password = postgres_server.password
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    first = _generate(client, 1)
    first_ids = [item.model_extra["grefine"]["record_id"] for item in first.parse().data]
    with QualityLog(url) as log:
        logged = {record.record_id: record for record in log.read()}
    assert set(first_ids) <= set(logged)  # written before the response was sent
    assert {logged[i].request_id for i in first_ids} == {first.headers["x-request-id"]}

    postgres_server.stop()
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            _generate(client, 2)
        error = refused.value.body
        assert refused.value.status_code == 500 and error["code"] == "log_unavailable"
        assert password not in refused.value.response.text
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        assert password not in ready.text
    finally:
        postgres_server.start()

    third = _generate(client, 3)  # the records kept from the outage go in with this call's
    third_ids = [item.model_extra["grefine"]["record_id"] for item in third.parse().data]
    with QualityLog(url) as log:
        records = log.read()
    ids = [record.record_id for record in records]
    assert len(ids) == len(set(ids)) == 6, "each image's record exactly once: 2 before, 2 kept, 2 after"
    assert set(first_ids + third_ids) <= set(ids)
    assert sorted(record.seed for record in records) == [1, 2, 2, 3, 3, 4]

    feedback = httpx.post(f"{server.url}/v1/quality/feedback", json={"record_id": third_ids[0], "score": "up"},
                          timeout=30)
    assert feedback.status_code == 200, feedback.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert metric(metrics, "grefine_images_total", decision="skipped") == 6  # the outage's images were made too
    models = httpx.get(f"{server.url}/v1/models", timeout=30).text
    server.terminate()
    for said in (metrics, models, feedback.text, server.tail(1_000_000)):
        assert password not in said
    assert "postgresql://grefine:***@" in server.tail(1_000_000)
