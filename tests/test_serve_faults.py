"""``grefine serve`` under load and when things go wrong: a full queue, kill -9, SIGTERM, a bad model.

Real server processes on 127.0.0.1 with the tiny models; every load loop is bounded in count and
time and stops by itself.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from grefine_hooks import QualityLog

from serving import GREFINE, SKIP_ALL, ServerProcess, free_port, metric

BODY = {"size": "64x64", "num_inference_steps": 2}


def _generate(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={**BODY, "prompt": prompt, **extra}, timeout=180)


def test_32_requests_from_8_clients_against_a_small_queue(tmp_path):
    with ServerProcess(tmp_path, "--max-queue", "3", "--max-batch", "2", "--batch-wait-ms", "20",
                       policy=SKIP_ALL) as server:
        def client(index: int) -> list[httpx.Response]:
            return [_generate(server.url, f"a photo of object {index}-{k}", n=1 + k % 2) for k in range(4)]

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            responses = [r for batch in pool.map(client, range(8)) for r in batch]
        assert len(responses) == 32 and time.monotonic() - started < 900
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 8, statuses
        for response in responses:
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "queue_full"
                assert int(response.headers["retry-after"]) >= 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 1 <= metric(metrics, "grefine_queue_high_water") <= 3
        answered = {item["grefine"]["record_id"]: response.headers["x-request-id"]
                    for response in responses if response.status_code == 200 for item in response.json()["data"]}
    logged = QualityLog(server.log).read()
    assert len(logged) == len(answered)  # exactly one record per image returned, none for a refusal
    assert {r.record_id: r.request_id for r in logged} == answered


def test_kill_9_under_load_loses_no_answered_record_and_the_server_restarts(tmp_path):
    server = ServerProcess(tmp_path, "--max-queue", "16", "--batch-wait-ms", "5", policy=SKIP_ALL).start()
    answered, stop = [], threading.Event()

    def client(index: int) -> None:
        for k in range(40):  # bounded; the kill ends it sooner
            if stop.is_set():
                return
            try:
                response = _generate(server.url, f"a cat {index}-{k}")
            except httpx.TransportError:
                return
            if response.status_code == 200:
                answered.extend(item["grefine"]["record_id"] for item in response.json()["data"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    while len(answered) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL, mid-run
    stop.set()
    for thread in threads:
        thread.join(200)
    assert len(answered) >= 6

    logged = {record.record_id for record in QualityLog(server.log).read()}  # reads: nothing torn
    assert set(answered) <= logged

    restarted = ServerProcess(tmp_path, policy=SKIP_ALL, log=server.log).start()
    try:
        response = _generate(restarted.url, "after the crash")
        assert response.status_code == 200
    finally:
        assert restarted.terminate() == 0
    after = QualityLog(server.log).read()
    assert {r.record_id for r in after} >= logged | {response.json()["data"][0]["grefine"]["record_id"]}


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(tmp_path):
    server = ServerProcess(tmp_path, policy=SKIP_ALL).start()
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(_generate(server.url, "a slow cat", num_inference_steps=12)))
    worker.start()
    deadline = time.monotonic() + 120
    while metric(httpx.get(f"{server.url}/metrics").text, "grefine_queue_wait_seconds_count") < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    assert server.terminate() == 0
    worker.join(60)
    assert result and result[0].status_code == 200
    [record] = QualityLog(server.log).read()
    assert record.record_id == result[0].json()["data"][0]["grefine"]["record_id"]
    assert "Finished server process" in server.tail()


def test_a_model_that_cannot_load_exits_with_a_message_naming_it(tmp_path):
    result = subprocess.run(
        [str(GREFINE), "serve", "--model", str(tmp_path / "no-such-model"), "--port", str(free_port()),
         "--log", str(tmp_path / "quality.jsonl")], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no-such-model" in result.stderr and "model_index.json" in result.stderr
