from __future__ import annotations

from consumer.tagging.resilience import CircuitBreaker, RateLimiter


def test_breaker_opens_after_consecutive_failures_and_half_opens_once() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, reset_s=5, clock=lambda: now[0])
    for _ in range(2):
        assert b.allow()
        b.record(False)
    b.record(True)  # a success resets the count
    for _ in range(3):
        b.record(False)
    assert b.is_open and not b.allow()
    now[0] = 5.0
    assert b.allow()  # the one trial
    assert not b.allow()  # ...and only one
    b.record(False)  # trial failed: open again, for another reset_s
    assert not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.record(True)
    assert not b.is_open and b.allow()


def test_rate_limiter_spends_tokens_and_refills() -> None:
    now = [0.0]
    rl = RateLimiter(rate=2, burst=2, clock=lambda: now[0])
    assert rl.acquire(0) and rl.acquire(0)
    assert not rl.acquire(0)  # empty bucket, no time to wait
    now[0] = 0.5  # one token refilled at 2/s
    assert rl.acquire(0)
    assert not rl.acquire(0)
