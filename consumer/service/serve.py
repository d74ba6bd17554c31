"""`tagstream run`: serve with the chosen runtime until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading

import structlog
from prometheus_client import CollectorRegistry

from consumer.service.health import HealthServer, HealthState
from consumer.service.stack import build_stack
from consumer.tagging.config import Settings

log = structlog.get_logger(__name__)


def run_service(settings: Settings, registry: CollectorRegistry | None = None) -> None:
    """`tagstream run`: serve until SIGTERM/SIGINT, then finish the batch, commit, exit."""
    from consumer.service.runner import KafkaService

    if settings.runtime == "faust":
        from consumer.service.faust_runtime import run_faust

        run_faust(settings)
        return

    stop = threading.Event()
    healths: list[HealthState] = []

    def _stop(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        for health in healths:  # not ready from this moment, not from the loop's next turn
            health.stopping = True
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with build_stack(settings, registry) as stack:
        healths.append(stack.health)
        server = HealthServer(
            stack.metrics.registry, stack.health, settings.metrics_host, settings.metrics_port
        ).start()
        log.info("metrics_listening", host=settings.metrics_host, port=server.port)
        try:
            KafkaService(settings, stack.core, stack.metrics, stack.health).run(stop)
        finally:
            server.stop()
