"""A real ``grefine serve`` process on 127.0.0.1 for the service tests (tiny models, offline)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

GREFINE = Path(sys.executable).with_name("grefine")  # the installed console script, entry points and all
# Images skip refinement (p, a >= 0 always): fast runs for tests about traffic, not refinement.
SKIP_ALL = {"p_threshold": 0.0, "a_threshold": 0.0}
REFINE_ALL = {"p_threshold": 1.0, "a_threshold": 1.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``grefine serve --tiny`` in a subprocess, with its own port, quality log and policy file."""

    def __init__(self, directory: Path, *arguments: str, policy: dict | None = None, log: Path | None = None):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or directory / "quality.sqlite"
        self.arguments = list(arguments)
        if policy is not None:
            policy_file = directory / f"policy-{self.port}.json"
            policy_file.write_text(json.dumps(policy))
            self.arguments += ["--policy", str(policy_file)]
        self.process: subprocess.Popen | None = None
        self.output = directory / f"server-{self.port}.log"

    def start(self, ready_within: float = 240.0) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [str(GREFINE), "serve", "--tiny", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log", str(self.log), *self.arguments]
        with open(self.output, "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.directory)
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"grefine serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"grefine serve was not ready within {ready_within} s:\n{self.tail()}")

    def tail(self, characters: int = 4000) -> str:
        return self.output.read_text(errors="replace")[-characters:]

    def terminate(self, within: float = 120.0) -> int:
        """SIGTERM, then the exit code (killed and a failure past ``within`` seconds)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"grefine serve did not exit within {within} s of SIGTERM:\n{self.tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.kill()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
