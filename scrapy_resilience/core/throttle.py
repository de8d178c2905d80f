"""Delay rules of the adaptive throttle, one :class:`DomainThrottle` per domain.

Pure logic: no Scrapy import. Times are monotonic seconds passed in by the
caller, so every rule is tested with a fake clock. The rules below are
rules 1 to 7 of ``docs/throttle.rst``, which adds how admission applies the
delay.

1. Latency. Each attempt's latency (failures included) enters a window of
   the domain's last :data:`LATENCY_WINDOW` latencies. The latency delay is
   the window's median divided by the target concurrency. The median ignores
   a minority of timeouts or instant errors.
2. Pacing threshold. A domain that has never been throttled and has no
   rate-limit delay (rule 6) is paced only while its latency delay is at
   least ``min_delay``. Once paced, it is released when that delay falls below
   ``min_delay * RELEASE_SHARE``. A domain that has been throttled stays paced
   for the rest of the crawl.
3. Throttled responses. A throttled response (429, or 503 with ``Retry-After``)
   to an attempt that started after the previous raise multiplies the delay
   in force by :data:`BACKOFF_FACTOR`, or sets ``start_delay`` when the domain
   was not paced. Throttled responses to attempts sent before the raise belong
   to the same burst and change nothing. A paced domain also gets a knee, the
   delay where fast recovery stops. After at least :data:`SHORT_CYCLE`
   successful responses since the previous raise, the knee is the delay in force
   times ``1 + KNEE_MARGIN``. After fewer, the pace was far too fast. Then the
   knee is the geometric mean of the delay in force and the slowest delay at
   which a response succeeded since the previous raise, at least the raised
   delay, and the delay jumps to the knee. With no successful response since
   the previous raise, the knee stays.
4. Recovery. Each successful response to an attempt that started after the
   previous raise lowers the throttled delay by
   :data:`FAST_RECOVERY` of itself while it is above the knee, but not below
   the knee. Responses to attempts sent before the previous raise tell nothing
   about the new pace, and change neither the throttled delay nor the knee.
5. Probing. At or below the knee, each successful response lowers the throttled
   delay by ``PROBE_RATE * delay`` of itself, at most :data:`PROBE_MAX_STEP`,
   so the delay falls by about 1% per second of crawling until the site
   throttles again. Other failures (server errors, network errors, timeouts)
   leave the throttled delay alone.
6. Rate-limit headers. ``remaining`` requests left before a reset in
   ``reset`` seconds give the delay ``reset / (remaining + 1)`` until that
   reset, which spreads the remaining requests over the window. It applies,
   whatever ``min_delay``, only while crawling without pacing would go faster:
   while ``concurrency`` requests per median latency exceed one request per
   that delay. No request left (``remaining`` 0) pauses the domain until the
   reset instead.
7. The delay is the largest of the latency delay, the throttled delay and the
   rate-limit delay, capped at ``max_delay``. Floors (``DOWNLOAD_DELAY``,
   ``DOWNLOAD_SLOTS``, robots.txt ``Crawl-delay``) are applied by the
   registry, which paces by the larger of the floor and this delay.
"""

from __future__ import annotations

import enum
import math
from array import array
from dataclasses import dataclass

from scrapy_resilience.core.headers import RateLimit

#: Attempts whose median latency sets the latency delay (rule 1). Odd, so the
#: median of a full window is one measured latency.
LATENCY_WINDOW = 9

#: Factor by which a throttled response multiplies the delay in force (rule 3).
BACKOFF_FACTOR = 1.5

#: Margin above the delay that was throttled where fast recovery stops (rule 3).
KNEE_MARGIN = 0.15

#: Successful responses since the previous raise below which a throttled pace
#: sets the knee at the raised delay rather than just above itself (rule 3).
SHORT_CYCLE = 20

#: Share of the throttled delay that each success removes above the knee (rule 4).
FAST_RECOVERY = 0.2

#: Share of the throttled delay removed per second of delay by each success at
#: or below the knee (rule 5), in 1/s: about 1% of the delay per second of crawling.
PROBE_RATE = 0.01

#: Largest share of the throttled delay that one success removes at or below
#: the knee (rule 5), which slows the probing of domains slower than one
#: response every half second.
PROBE_MAX_STEP = 0.005

#: Share of ``min_delay`` below which a domain paced by latency or rate-limit
#: headers is released (rule 2). Below 1, so a delay near the threshold does not
#: switch pacing on and off at every attempt.
RELEASE_SHARE = 0.5

#: Growth of the bucket bounds of :class:`LatencySketch`: quantiles are within
#: about 2.5% of a measured latency.
SKETCH_GROWTH = 1.05

#: Latencies below this many seconds share the sketch's lowest bucket.
SKETCH_MIN_SECONDS = 1e-4


class Outcome(enum.Enum):
    """Outcome of an attempt, as the throttle's rules distinguish them."""

    #: A response that is not a failure, whatever its status.
    SUCCESS = "success"
    #: Status 429, or 503 with ``Retry-After``.
    THROTTLED = "throttled"
    #: Any other failure: a server error, a network error, a timeout.
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    """The numbers the delay rules use, all in seconds except the concurrency.

    ``target_concurrency`` divides the median latency (rule 1), and
    ``min_delay`` is the pacing threshold (rule 2). ``start_delay`` is the first
    delay of a domain throttled while not paced (rule 3), and ``max_delay``
    caps every delay (rule 7).
    """

    target_concurrency: float = 1.0
    min_delay: float = 0.5
    start_delay: float = 1.0
    max_delay: float = 10.0


@dataclass(frozen=True, slots=True)
class Adjustment:
    """The change one attempt made to its domain's delay.

    ``old_delay`` and ``new_delay`` are the throttle's delay before and after,
    ``reason`` names the rule behind the new value (``latency``, ``throttled``,
    ``recovery``, ``rate_limit`` or ``released``), and ``latency`` is the median
    of the latency window, or None while it is empty. ``not_before`` is the
    earliest monotonic time of the domain's next admission after a raise, and
    ``pause_until`` the end of a pause asked by rate-limit headers.
    """

    old_delay: float
    new_delay: float
    reason: str
    latency: float | None
    not_before: float | None = None
    pause_until: float | None = None

    @property
    def changed(self) -> bool:
        return self.new_delay != self.old_delay


class DomainThrottle:
    """The throttle's state for one domain, and the delay it sets.

    ``delay`` is the delay in seconds that the throttle sets for the domain
    (0 when it does not pace it). ``throttled`` turns True at the domain's
    first throttled response.
    """

    __slots__ = (
        "_latencies",
        "_next_slot",
        "delay",
        "hint_delay",
        "hint_until",
        "knee",
        "last_raise",
        "rate_delay",
        "slowest_success",
        "successes_since_raise",
        "throttled",
    )

    def __init__(self) -> None:
        self._latencies = array("d")
        self._next_slot = 0
        self.delay = 0.0
        self.rate_delay = 0.0
        self.knee = 0.0
        self.throttled = False
        self.last_raise = -math.inf
        self.successes_since_raise = 0
        self.slowest_success = 0.0
        self.hint_delay = 0.0
        self.hint_until = -math.inf

    @property
    def latency(self) -> float | None:
        """The median of the latency window in seconds, or None while it is empty."""
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    def record(
        self,
        rules: ThrottleRules,
        now: float,
        *,
        outcome: Outcome,
        latency: float | None,
        started: float,
        floor: float = 0.0,
        rate_limit: RateLimit | None = None,
        concurrency: int = 1,
    ) -> Adjustment | None:
        """Apply one attempt to the rules and return what changed, or None.

        ``latency`` is the attempt's duration in seconds, or None when it must
        not enter the latency window. ``started`` is the monotonic time the
        attempt started, and ``floor`` the domain's floor delay, which counts
        as the delay in force when it is larger (rule 3). ``concurrency`` is
        the most requests the domain may have in flight when it is not paced
        (rule 6).
        """
        old = self.delay
        if latency is not None:
            self._add_latency(latency)

        not_before = None
        current = started > self.last_raise
        if outcome is Outcome.THROTTLED and current:
            self._raise(rules, now, floor)
            not_before = started + self.rate_delay
        elif outcome is Outcome.SUCCESS and current:
            self._recover()

        pause_until = None
        if rate_limit is not None:
            pause_until = self._apply_rate_limit(rate_limit, now)

        latency_delay = self._latency_delay(rules)
        hint = self._hint(now, concurrency)
        self.delay = self._paced_delay(rules, latency_delay, hint)
        if self.delay == old and not_before is None and pause_until is None:
            return None
        reason = self._reason(
            latency_delay, hint, raised=not_before is not None, paused=pause_until is not None
        )
        return Adjustment(old, self.delay, reason, self.latency, not_before, pause_until)

    def _add_latency(self, latency: float) -> None:
        if not math.isfinite(latency) or latency < 0:
            return
        if len(self._latencies) < LATENCY_WINDOW:
            self._latencies.append(latency)
        else:
            self._latencies[self._next_slot] = latency
        self._next_slot = (self._next_slot + 1) % LATENCY_WINDOW

    def _raise(self, rules: ThrottleRules, now: float, floor: float) -> None:
        """Raise the throttled delay for a new burst and move the knee (rule 3)."""
        in_force = max(self.delay, floor)
        raised = in_force * BACKOFF_FACTOR if in_force > 0 else rules.start_delay
        self.rate_delay = min(rules.max_delay, raised)
        # A throttled response right after a raise can come from a deficit the
        # site still counts from the burst before: it raises the delay again,
        # but only a pace that had succeeded moves the knee.
        if self.successes_since_raise and in_force > 0:
            if self.successes_since_raise >= SHORT_CYCLE:
                self.knee = in_force * (1 + KNEE_MARGIN)
            else:
                # The limit lies between the pace throttled and the slowest
                # pace that worked: start from the middle of that range.
                middle = math.sqrt(in_force * self.slowest_success)
                self.knee = max(self.rate_delay, min(rules.max_delay, middle))
                self.rate_delay = self.knee
        self.throttled = True
        self.last_raise = now
        self.successes_since_raise = 0
        self.slowest_success = 0.0

    def _recover(self) -> None:
        """Lower the throttled delay after a successful response (rules 4 and 5)."""
        self.successes_since_raise += 1
        self.slowest_success = max(self.slowest_success, self.delay)
        if not self.throttled:
            return
        if self.rate_delay > self.knee:
            self.rate_delay = max(self.knee, self.rate_delay * (1 - FAST_RECOVERY))
        else:
            step = min(PROBE_MAX_STEP, PROBE_RATE * self.rate_delay)
            self.rate_delay *= 1 - step

    def _apply_rate_limit(self, rate_limit: RateLimit, now: float) -> float | None:
        """Read rate-limit headers (rule 6); return the end of a pause they ask for."""
        remaining, reset = rate_limit.remaining, rate_limit.reset
        if remaining is None or reset is None:
            return None
        if reset <= 0:
            # The window resets now, so the headers ask for no wait.
            self.hint_delay = 0.0
            return None
        if remaining == 0:
            self.hint_delay = 0.0
            return now + reset
        self.hint_delay = reset / (remaining + 1)
        self.hint_until = now + reset
        return None

    def _latency_delay(self, rules: ThrottleRules) -> float:
        median = self.latency
        return 0.0 if median is None else median / rules.target_concurrency

    def _hint(self, now: float, concurrency: int) -> float:
        """Return the rate-limit delay in force (rule 6), or 0."""
        if now >= self.hint_until or self.hint_delay <= 0:
            return 0.0
        # Unpaced, the domain gets up to `concurrency` responses per latency.
        latency = self.latency
        if latency is not None and self.hint_delay * concurrency <= latency:
            return 0.0
        return self.hint_delay

    def _paced_delay(self, rules: ThrottleRules, latency_delay: float, hint: float) -> float:
        """Return the delay the rules set now (rules 2 and 7)."""
        target = max(latency_delay, self.rate_delay, hint)
        target = min(rules.max_delay, target)
        if self.throttled or hint > 0:
            return target
        # A threshold above max_delay counts as max_delay, so a low cap never
        # turns the latency rule off.
        threshold = min(rules.min_delay, rules.max_delay)
        if self.delay > 0:
            threshold *= RELEASE_SHARE
        return target if target >= threshold else 0.0

    def _reason(self, latency_delay: float, hint: float, *, raised: bool, paused: bool) -> str:
        if raised:
            return "throttled"
        if self.delay == 0:
            return "rate_limit" if paused else "released"
        components = {
            "latency": latency_delay,
            "recovery": self.rate_delay,
            "rate_limit": hint,
        }
        return max(components, key=lambda name: components[name])


class LatencySketch:
    """Latency quantiles of one domain in bounded memory.

    Each latency is counted in a bucket whose bounds grow by
    :data:`SKETCH_GROWTH`, so a quantile is known within about 2.5% of a
    measured latency, however many attempts the domain had. A few hundred
    buckets at most cover latencies from 0.1 ms to hours, and a domain with a
    steady latency uses a few.
    """

    __slots__ = ("_counts", "count")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.count = 0

    def add(self, seconds: float) -> None:
        """Count one latency in seconds; negative and non-finite values are ignored."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        index = math.ceil(math.log(max(seconds, SKETCH_MIN_SECONDS)) / math.log(SKETCH_GROWTH))
        self._counts[index] = self._counts.get(index, 0) + 1
        self.count += 1

    def quantile(self, share: float) -> float | None:
        """Return the latency below which ``share`` (0 to 1) of the attempts
        fall, in seconds, or None when no latency was counted."""
        if not self.count:
            return None
        rank = max(1, math.ceil(share * self.count))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                return _bucket_value(index)
        return _bucket_value(max(self._counts))


def _bucket_value(index: int) -> float:
    """Return the value that represents bucket ``index``, ``(g**(i-1), g**i]``,
    with the same relative error to both bounds."""
    upper: float = SKETCH_GROWTH**index
    return 2 * upper / (SKETCH_GROWTH + 1)


def crawl_delay_floor(crawl_delay: float | None, max_delay: float) -> float:
    """Return the floor delay a robots.txt ``Crawl-delay`` sets, in seconds.

    The value is capped at ``max_delay``; a missing, negative or non-finite
    value gives 0.
    """
    if crawl_delay is None or not math.isfinite(crawl_delay) or crawl_delay <= 0:
        return 0.0
    return min(crawl_delay, max_delay)
