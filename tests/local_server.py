"""Start and stop the MLflow servers that the serving and UI tests run on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_environment(tracking_uri: str, **extra: str) -> dict[str, str]:
    """Return the environment of the test process with only the given MLflow backend.

    MLFLOW_* variables of the calling shell (a tracking server, a run id) are dropped so
    that the server uses the test's SQLite backend and nothing else.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_REGISTRY_URI=tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


class LocalServer:
    """A server subprocess in its own process group, with its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, url: str) -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_until_ready(self, path: str, timeout_s: float) -> None:
        """Poll ``url + path`` until it returns 200; raise with the server log otherwise."""
        deadline = time.monotonic() + timeout_s
        session = http_session()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if session.get(self.url + path, timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or busy starting
            time.sleep(0.5)
        raise TimeoutError(f"Server at {self.url} not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        """Return the last 5000 characters of the server output."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


def http_session() -> requests.Session:
    """Return a requests session that ignores proxy settings of the environment."""
    session = requests.Session()
    session.trust_env = False
    return session
