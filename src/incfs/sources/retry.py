"""Retrying transient failures: one policy object, one helper, every backend.

Backoff is exponential with *full jitter* (sleep a uniform random time in
`[0, min(max_delay, base_delay * 2**n)]`): many FUSE readers failing at the
same moment would otherwise retry in lock-step and hammer a recovering server.

Only `TransientSourceError` is retried; permanent errors and bugs propagate at
once. A total `deadline` bounds the whole operation including the attempt in
flight, so a caller blocked in a FUSE read gets an answer in bounded time;
`deadline=None` together with `max_attempts=None` retries forever, which is
what a "hard mount" over a flaky link wants.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from incfs.errors import UsageError
from incfs.sources.base import SourceError, SourceStats, TransientSourceError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up.

    max_attempts: attempts in total (1 = no retry); None = unlimited.
    base_delay / max_delay: backoff bounds in seconds.
    deadline: seconds for the whole operation, attempts and sleeps included;
              None = no overall limit.
    """

    max_attempts: int | None = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float | None = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise UsageError("RetryPolicy.max_attempts must be >= 1 or None")
        if self.base_delay < 0 or self.max_delay < 0:
            raise UsageError("RetryPolicy delays must be >= 0")
        if self.deadline is not None and self.deadline <= 0:
            raise UsageError("RetryPolicy.deadline must be > 0 or None")

    @classmethod
    def no_retry(cls, deadline: float | None = 120.0) -> RetryPolicy:
        """A single attempt (still bounded by `deadline`)."""
        return cls(max_attempts=1, deadline=deadline)

    @classmethod
    def forever(cls, base_delay: float = 0.5, max_delay: float = 30.0) -> RetryPolicy:
        """Never give up on transient errors (permanent ones still raise)."""
        return cls(max_attempts=None, base_delay=base_delay, max_delay=max_delay, deadline=None)

    @classmethod
    def failover(cls) -> RetryPolicy:
        """For one mirror inside a mirror set: retry once, quickly, then let
        the set move on to another mirror instead of waiting here."""
        return cls(max_attempts=2, base_delay=0.05, max_delay=0.5, deadline=60.0)

    def backoff(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Sleep before retry number `retry_number` (0 = first retry)."""
        # Cap the exponent so 2**n cannot overflow on endless retries.
        ceiling = min(self.max_delay, self.base_delay * math.pow(2, min(retry_number, 60)))
        return (rng or random).uniform(0.0, ceiling)


async def call_with_retry(
    policy: RetryPolicy,
    op: Callable[[], Awaitable[T]],
    *,
    name: str,
    stats: SourceStats | None = None,
) -> T:
    """Run `op()` until it succeeds, raises a non-transient error, or the
    policy is exhausted; then re-raise the last TransientSourceError.

    `stats.errors` counts failed attempts (permanent failures included),
    `stats.retries` the attempts made after the first. Exceeding the deadline
    mid-attempt cancels that attempt and raises TransientSourceError (the
    link was too slow, not wrong).
    """
    deadline = math.inf if policy.deadline is None else trio.current_time() + policy.deadline
    attempt = 0
    while True:
        attempt += 1
        failure: TransientSourceError | None = None
        with trio.move_on_at(deadline) as scope:
            try:
                return await op()
            except TransientSourceError as exc:
                failure = exc
            except SourceError:
                if stats is not None:
                    stats.errors += 1
                raise  # permanent: retrying cannot help
        if stats is not None:
            stats.errors += 1
        if failure is None:  # the deadline cancelled the attempt in flight
            assert scope.cancelled_caught
            raise TransientSourceError(
                f"{name}: no answer within the {policy.deadline:g}s deadline")
        if policy.max_attempts is not None and attempt >= policy.max_attempts:
            raise failure
        delay = policy.backoff(attempt - 1)
        if trio.current_time() + delay >= deadline:
            raise failure
        await trio.sleep(delay)
        if stats is not None:
            stats.retries += 1
