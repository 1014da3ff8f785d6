"""Ray Serve replicas on a real local Ray cluster (``ray.init(num_cpus=2)``), over HTTP on 127.0.0.1.

Two replicas of the tiny SD 1.5 pipeline, each loading its own pipeline and scorer in its own
actor process, writing one SQLite log. Skips only where Ray is not installed (CI installs it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from grefine_hooks import QualityLog

from serving import SKIP_ALL, free_port

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'grefine-hooks[ray]')")
from ray import serve  # noqa: E402

from grefine_integrations.ray_serve import build_app  # noqa: E402
from grefine_integrations.serve import ModelSettings, ServiceConfig  # noqa: E402

BODY = {"size": "64x64", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log = tmp_path_factory.mktemp("ray") / "quality.sqlite"
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(ModelSettings(tiny=True, policy=SKIP_ALL, run_id="ray-test"),
                    ServiceConfig(max_queue=16, batch_wait_ms=0), log=str(log), replicas=2, num_cpus=1)
    serve.run(app, name="grefine", route_prefix="/")
    yield f"http://127.0.0.1:{port}", log
    serve.shutdown()
    ray.shutdown()


def _generate(url: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={**BODY, "prompt": prompt}, timeout=300)


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::"))


def _running_replicas() -> int:
    status = serve.status().applications["grefine"].deployments["grefine"]
    return status.replica_states.get("RUNNING", 0)


def test_concurrent_requests_are_spread_over_replicas_with_one_record_per_image(cluster):
    url, log = cluster
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: _generate(url, f"a cat number {i}"), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    ids = [item["grefine"]["record_id"] for r in responses for item in r.json()["data"]]
    records = {r.record_id: r for r in QualityLog(log).read()}
    assert len(records) == len(ids) == 8 and set(ids) == set(records)
    assert len({record.replica for record in records.values()}) == 2  # both replicas served some
    assert all(record.run_id == "ray-test" for record in records.values())


def test_a_killed_replica_is_replaced_and_no_answered_record_is_lost(cluster):
    url, log = cluster
    [victim, *_] = _replica_actors()
    answered: list[str] = []

    def client(i: int) -> int:
        try:
            response = _generate(url, f"a dog number {i}")
        except httpx.TransportError:
            return -1
        if response.status_code == 200:
            answered.extend(item["grefine"]["record_id"] for item in response.json()["data"])
        return response.status_code

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client, i) for i in range(8)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        statuses = [future.result(300) for future in running]
    assert statuses.count(200) >= 1

    deadline = time.monotonic() + 240
    while (_running_replicas() < 2 or victim in _replica_actors()) and time.monotonic() < deadline:
        time.sleep(1)
    assert _running_replicas() == 2 and victim not in _replica_actors()  # Serve brought a new one

    later = [_generate(url, f"after the kill {i}") for i in range(4)]
    assert [r.status_code for r in later] == [200] * 4
    answered += [item["grefine"]["record_id"] for r in later for item in r.json()["data"]]
    logged = {record.record_id for record in QualityLog(log).read()}
    assert set(answered) <= logged


def test_the_policy_changes_on_a_running_deployment_and_records_say_which(cluster):
    url, log = cluster
    app = build_app(ModelSettings(tiny=True, policy=SKIP_ALL, run_id="ray-test"),
                    ServiceConfig(max_queue=16, batch_wait_ms=0), log=str(log), replicas=2, num_cpus=1,
                    policy={"p_threshold": 1.0, "a_threshold": 1.0, "guard": False})
    serve.run(app, name="grefine", route_prefix="/")  # same code, new user_config: reconfigure in place
    response = _generate(url, "a red cube")
    assert response.status_code == 200
    summary = response.json()["data"][0]["grefine"]
    assert summary["decision"] == "refined"
    [record] = [r for r in QualityLog(log).read() if r.record_id == summary["record_id"]]
    assert record.policy["p_threshold"] == 1.0 and record.policy["guard"] is False

    with pytest.raises(ValueError, match="p_threshold must be in"):  # refused before reaching a replica
        build_app(ModelSettings(tiny=True, policy=SKIP_ALL), ServiceConfig(), log=str(log), policy={"p_threshold": 7})


def test_grefine_serve_ray_checks_its_flags_before_starting_ray(capsys):
    from grefine_hooks.cli import main

    assert main(["serve", "--ray", "--tiny", "--autoscaling", "{not json"]) == 2
    assert "--autoscaling must be a JSON object" in capsys.readouterr().err
    assert main(["serve", "--ray", "--tiny", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
