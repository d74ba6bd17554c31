"""One HTTP port for /metrics, /healthz and /readyz.

/healthz: the poll loop went round within max.poll.interval (liveness).
/readyz: the encoder is warmed up, the loop is consuming (past the start-up topic check) and
alive, and no shutdown has begun (readiness). Owning a partition is not part of it: a replica
beyond the partition count is idle, not broken, and a rollout with `maxUnavailable: 0` would
otherwise wait forever for a new pod that cooperative-sticky gives nothing
(`tagstream_assigned_partitions` shows it).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tagsys.errors import TagstreamError


class HealthState:
    def __init__(self, max_poll_interval_s: float) -> None:
        self.max_poll_interval_s = max_poll_interval_s
        self.last_poll = time.monotonic()
        self.warmed = False
        self.consuming = False
        self.assigned = 0  # partitions owned; a replica beyond the partition count idles
        self.stopping = False

    def beat(self) -> None:
        self.last_poll = time.monotonic()
        self.consuming = True

    def alive(self) -> bool:
        return time.monotonic() - self.last_poll < self.max_poll_interval_s

    def ready(self) -> bool:
        return self.warmed and self.consuming and not self.stopping and self.alive()


class HealthServer:
    def __init__(
        self, registry: CollectorRegistry, state: HealthState, host: str, port: int
    ) -> None:
        self.state = state
        registry_ = registry
        state_ = state

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry_), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok = state_.alive()
                    body, ctype, code = (
                        (b"ok\n" if ok else b"stalled\n"),
                        "text/plain",
                        (200 if ok else 503),
                    )
                elif path == "/readyz":
                    ok = state_.ready()
                    body, ctype, code = (
                        (b"ready\n" if ok else b"not ready\n"),
                        "text/plain",
                        (200 if ok else 503),
                    )
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:  # the port is taken, or the address is not this host's
            raise TagstreamError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e} "
                "(--metrics-port / --metrics-host)"
            ) from None
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
