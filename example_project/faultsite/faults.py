"""Fault decisions of the site: seeded hashes, the token bucket and latency picks.

Everything here is pure: no sockets, no clock reads (callers pass the time in), and
no randomness other than a hash of the seed and the request, so a run repeats.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field


def unit_hash(*parts: object) -> float:
    """Return a number in [0, 1) derived from the parts by SHA-256.

    The same parts give the same number in every process and on every machine,
    unlike Python's salted ``hash()``.
    """
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fault_hits(kind: str, seed: int, host: str, path: str, attempt: int, *, rate: float) -> bool:
    """Return True when a fault of this kind hits this attempt.

    ``kind`` salts the hash, so the flaky, ban and reset profiles fail on different
    attempts for the same seed. ``attempt`` counts requests for the path on the host,
    starting at 1. A rate of 0 never hits and a rate of 1 always hits.
    """
    return unit_hash(kind, seed, host, path, attempt) < rate


def flaky_fails(seed: int, host: str, path: str, attempt: int, rate: float) -> bool:
    """Return True when the flaky profile responds 503 to this attempt.

    ``host`` is the host's name from the config (not its address), ``path`` is the
    request target as sent (``/library/os.html``), and ``attempt`` is how many
    requests for that path the host has received, counting this one.
    """
    return fault_hits("flaky", seed, host, path, attempt, rate=rate)


def pick_latency(seed: int, host: str, path: str, latency: tuple[float, float]) -> float:
    """Return the delay in seconds before responding to a request for the path.

    ``latency`` is an inclusive (minimum, maximum) range. The pick depends only on the
    seed, host and path, so each page keeps its delay across attempts and runs.
    """
    low, high = latency
    if high <= low:
        return low
    return low + (high - low) * unit_hash("latency", seed, host, path)


@dataclass
class TokenBucket:
    """Token bucket that refills at ``rate`` tokens per second up to ``burst``.

    It starts full. Times are monotonic seconds passed in by the caller. With
    ``penalize_rejected``, a rejected request also takes a token, and the level may
    fall to ``-burst``, so a client that keeps sending while rejected waits longer.
    """

    rate: float
    burst: int
    penalize_rejected: bool = False
    level: float = field(init=False)
    updated: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.level = float(self.burst)

    def take(self, now: float) -> bool:
        """Take a token at time ``now`` and return True, or return False if none is left."""
        self._refill(now)

        if self.level >= 1.0:
            self.level -= 1.0
            return True

        if self.penalize_rejected:
            self.level = max(self.level - 1.0, -float(self.burst))
        return False

    def remaining(self, now: float) -> int:
        """Return the whole tokens available at time ``now`` (0 when the level is negative)."""
        self._refill(now)
        return max(0, math.floor(self.level))

    def seconds_until_full(self, now: float) -> float:
        """Return the seconds from ``now`` until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.burst - self.level) / self.rate)

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            elapsed = now - self.updated
            self.level = min(float(self.burst), self.level + elapsed * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now
