"""Small guards around the LLM: a circuit breaker and a token-bucket rate limiter.

Retries themselves go through tenacity (see consumer/tagging/llm.py); these two hold state across
requests, which tenacity does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Open after `failures` consecutive failures; after `reset_s`, let one trial through.

    While open, callers skip the LLM at once (the item goes to review or is deferred) instead
    of queueing behind a dead endpoint.
    """

    def __init__(
        self, failures: int = 5, reset_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = max(1, failures)
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if not self._trial and self._clock() - self._opened_at >= self.reset_s:
                self._trial = True  # half-open: exactly one request probes the endpoint
                return True
            return False

    def record(self, success: bool) -> None:
        with self._lock:
            if success:
                self._consecutive = 0
                self._opened_at = None
                self._trial = False
                return
            self._consecutive += 1
            if self._trial or self._consecutive >= self.failures:
                self._opened_at = self._clock()
            self._trial = False


class RateLimiter:
    """Token bucket: `rate` requests per second on average, bursts up to `burst`."""

    def __init__(
        self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.capacity = float(burst or max(1, int(rate)))
        self._tokens = self.capacity
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, timeout_s: float | None = None) -> bool:
        """Take a token, waiting for one; False when `timeout_s` passes first."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = (1 - self._tokens) / self.rate
            if deadline is not None and self._clock() + wait > deadline:
                return False
            time.sleep(wait)
