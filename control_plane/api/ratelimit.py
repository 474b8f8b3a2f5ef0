"""Per-address token buckets for failed credential checks (bearer/Basic, enrollment, dashboard login).

Only failures take a token, so a client that knows its credential is never slowed; one whose bucket
is empty is refused (429 `rate_limited`, Retry-After) before its next guess is even checked.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from control_plane.errors import DomainError, ErrorCode

MAX_TRACKED_ADDRESSES = 10_000


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """`rates`: failures allowed per minute per family (also the burst); 0 turns a family off."""

    def __init__(self, rates: dict[str, int], clock: Callable[[], float] = time.monotonic) -> None:
        self._rates = dict(rates)
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, request: Request, family: str) -> None:
        """Raise 429 when this address has no failure left in `family`."""
        rate = self._rates.get(family, 0)
        if rate <= 0:
            return
        with self._lock:
            bucket = self._refilled(family, _address(request), rate)
            if bucket is None or bucket.tokens >= 1:
                return
            wait_s = math.ceil((1 - bucket.tokens) * 60 / rate)
        raise DomainError(
            ErrorCode.RATE_LIMITED,
            f"too many failed attempts from this address; retry in {wait_s} s",
            retry_after_s=wait_s,
        )

    def charge(self, request: Request, family: str) -> None:
        """Take one token for a failed attempt."""
        rate = self._rates.get(family, 0)
        if rate <= 0:
            return
        key = (family, _address(request))
        with self._lock:
            bucket = self._refilled(family, key[1], rate) or _Bucket(float(rate), self._clock())
            bucket.tokens = max(0.0, bucket.tokens - 1)
            self._buckets[key] = bucket
            self._buckets.move_to_end(key)
            while len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._buckets.popitem(last=False)

    def _refilled(self, family: str, address: str, rate: int) -> _Bucket | None:
        bucket = self._buckets.get((family, address))
        if bucket is None:
            return None
        now = self._clock()
        bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.stamp) * rate / 60)
        bucket.stamp = now
        return bucket


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
