"""Pacing rules: how admission spaces the requests of a delayed domain.

A domain with a delay has at most one request admitted at a time, and each
admission starts at least ``delay * (1 + u)`` seconds after the previous one,
with ``u`` drawn from ``[0, jitter]``. The jitter only lengthens the gap, so
floors such as ``DOWNLOAD_DELAY`` or a robots.txt ``Crawl-delay`` always hold.
"""

from __future__ import annotations

import random


def effective_delay(*delays: float) -> float:
    """Return the delay in force: the largest of the floors and the adaptive
    delay, in seconds (0 when none is set)."""
    return max((delay for delay in delays if delay > 0), default=0.0)


def next_admission_time(now: float, delay: float, jitter: float, rng: random.Random) -> float:
    """Return the earliest monotonic time of the admission after one at ``now``."""
    if delay <= 0:
        return now
    return now + delay * (1.0 + rng.uniform(0.0, jitter))
