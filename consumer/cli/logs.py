"""structlog setup: key=value lines on a terminal, JSON lines otherwise; always to stderr."""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure(level: str = "info", json_logs: bool | None = None) -> None:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    as_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # resolve sys.stderr at each write, not now: a replaced stream (test runners, daemons)
        # must never turn a log line into an exception inside the service loop
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
