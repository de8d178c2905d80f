"""The adaptive throttle: its delay rules with a fake clock, a simulation of
admission against a token bucket, and the extension on a real runtime with no
reactor."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultsite.faults import TokenBucket
from scrapy import Request
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.http import HtmlResponse, TextResponse
from scrapy.settings import Settings
from scrapy.utils.test import get_crawler

from scrapy_resilience import AdaptiveThrottle, Addon, InvalidSettingError
from scrapy_resilience import runtime as runtime_module
from scrapy_resilience.core.circuit import CircuitConfig
from scrapy_resilience.core.classify import Category
from scrapy_resilience.core.headers import RateLimit
from scrapy_resilience.core.registry import Decision, DomainRegistry
from scrapy_resilience.core.throttle import (
    BACKOFF_FACTOR,
    FAST_RECOVERY,
    KNEE_MARGIN,
    LATENCY_WINDOW,
    PROBE_MAX_STEP,
    PROBE_RATE,
    SHORT_CYCLE,
    DomainThrottle,
    LatencySketch,
    Outcome,
    ThrottleRules,
    crawl_delay_floor,
)
from scrapy_resilience.downloadermiddlewares.circuitbreaker import (
    DONT_THROTTLE,
    CircuitBreakerMiddleware,
)
from scrapy_resilience.report import domain_fields
from scrapy_resilience.runtime import Attempt, Runtime, Track

THROTTLE_LOGGER = "scrapy_resilience.extensions.throttle"

RULES = ThrottleRules(target_concurrency=1.0, min_delay=0.5, start_delay=1.0, max_delay=10.0)


class Domain:
    """A :class:`DomainThrottle` driven by a fake clock: each call is one attempt
    that starts ``latency`` seconds before it ends, at the current time."""

    def __init__(self, rules: ThrottleRules = RULES) -> None:
        self.rules = rules
        self.throttle = DomainThrottle()
        self.now = 100.0

    def end_attempt(
        self,
        outcome: Outcome = Outcome.SUCCESS,
        latency: float = 0.01,
        *,
        started: float | None = None,
        floor: float = 0.0,
        rate_limit: RateLimit | None = None,
        advance: float = 0.5,
    ) -> Any:
        self.now += advance
        return self.throttle.record(
            self.rules,
            self.now,
            outcome=outcome,
            latency=latency,
            started=self.now - latency if started is None else started,
            floor=floor,
            rate_limit=rate_limit,
        )

    @property
    def delay(self) -> float:
        return self.throttle.delay


# Rule 1: latency


def test_latency_delay_is_median_over_target_concurrency() -> None:
    domain = Domain(ThrottleRules(target_concurrency=0.5, min_delay=0.1))
    for latency in (0.3, 0.9, 0.6):
        domain.end_attempt(latency=latency)

    assert domain.throttle.latency == pytest.approx(0.6)
    assert domain.delay == pytest.approx(1.2)


def test_median_ignores_minority_of_timeouts() -> None:
    domain = Domain(ThrottleRules(min_delay=0.1))
    for _ in range(LATENCY_WINDOW):
        domain.end_attempt(latency=0.05)
    for _ in range(LATENCY_WINDOW // 2):
        domain.end_attempt(Outcome.FAILURE, latency=30.0)

    assert domain.delay == 0.0


def test_latency_window_follows_new_latencies() -> None:
    domain = Domain(ThrottleRules(min_delay=0.1))
    for _ in range(LATENCY_WINDOW):
        domain.end_attempt(latency=2.0)
    assert domain.delay == pytest.approx(2.0)

    for _ in range(LATENCY_WINDOW // 2 + 1):
        domain.end_attempt(latency=0.01)
    assert domain.delay == 0.0


def test_invalid_latency_never_enters_window() -> None:
    domain = Domain(ThrottleRules(min_delay=0.1))
    domain.end_attempt(latency=1.0)
    domain.end_attempt(latency=math.nan)
    domain.end_attempt(latency=-3.0)

    assert domain.throttle.latency == 1.0


# Rule 2: the pacing threshold


def test_fast_domain_not_paced() -> None:
    domain = Domain()
    for _ in range(20):
        assert domain.end_attempt(latency=0.4) is None

    assert domain.delay == 0.0


def test_slow_domain_paced_from_threshold() -> None:
    domain = Domain()
    adjustment = domain.end_attempt(latency=0.5)

    assert adjustment.old_delay == 0.0
    assert adjustment.new_delay == pytest.approx(0.5)
    assert adjustment.reason == "latency"


def test_latency_pacing_released_below_half_threshold() -> None:
    domain = Domain()
    for _ in range(LATENCY_WINDOW):
        domain.end_attempt(latency=0.6)
    for _ in range(LATENCY_WINDOW):
        domain.end_attempt(latency=0.3)
    assert domain.delay == pytest.approx(0.3)

    adjustments = [domain.end_attempt(latency=0.2) for _ in range(LATENCY_WINDOW)]
    released = [a for a in adjustments if a is not None and a.new_delay == 0]
    assert len(released) == 1
    assert released[0].reason == "released"
    assert domain.delay == 0.0


def test_min_delay_above_max_counts_as_max() -> None:
    domain = Domain(ThrottleRules(min_delay=5.0, max_delay=1.0))
    domain.end_attempt(latency=3.0)

    assert domain.delay == 1.0


def test_zero_min_delay_paces_every_latency() -> None:
    domain = Domain(ThrottleRules(min_delay=0.0))
    domain.end_attempt(latency=0.002)

    assert domain.delay == pytest.approx(0.002)


# Rule 3: throttled responses


def test_first_throttled_response_sets_start_delay() -> None:
    domain = Domain()
    adjustment = domain.end_attempt(Outcome.THROTTLED, latency=0.01)

    assert adjustment.old_delay == 0.0
    assert adjustment.new_delay == RULES.start_delay
    assert adjustment.reason == "throttled"
    assert adjustment.not_before == pytest.approx(domain.now - 0.01 + RULES.start_delay)
    assert domain.throttle.throttled


def test_one_raise_per_burst() -> None:
    domain = Domain()
    burst_started = domain.now
    domain.end_attempt(Outcome.THROTTLED, started=burst_started)
    raised = domain.delay
    for _ in range(7):
        assert domain.end_attempt(Outcome.THROTTLED, started=burst_started) is None

    assert domain.delay == raised


def test_paced_throttled_response_multiplies_delay() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED)
    domain.end_attempt(Outcome.THROTTLED)

    assert domain.delay == pytest.approx(RULES.start_delay * BACKOFF_FACTOR)


def test_throttled_delay_capped_at_max() -> None:
    domain = Domain(ThrottleRules(max_delay=2.0))
    for _ in range(10):
        domain.end_attempt(Outcome.THROTTLED)

    assert domain.delay == 2.0


def test_start_delay_capped_at_max() -> None:
    domain = Domain(ThrottleRules(start_delay=5.0, max_delay=2.0))
    domain.end_attempt(Outcome.THROTTLED)

    assert domain.delay == 2.0


def test_floor_counts_as_delay_in_force() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED, floor=3.0)

    assert domain.delay == pytest.approx(3.0 * BACKOFF_FACTOR)


def test_throttled_domain_stays_paced() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED)
    for _ in range(2000):
        domain.end_attempt(latency=0.01)

    # The latency delay, 0.01 s, is far below min_delay, yet the domain stays paced.
    assert domain.throttle.rate_delay < 0.01
    assert domain.delay == pytest.approx(0.01)


# Rules 3 to 5: the knee, recovery and probing


def settle_knee(domain: Domain, successes: int) -> float:
    """Throttle a domain paced at ``START_DELAY``, after ``successes`` responses at
    that pace; return the delay that was throttled."""
    domain.end_attempt(Outcome.THROTTLED)
    domain.throttle.knee = domain.throttle.rate_delay
    for _ in range(successes):
        domain.end_attempt()
    in_force = domain.delay
    domain.end_attempt(Outcome.THROTTLED)
    return in_force


def test_knee_after_long_cycle_just_above_throttled_pace() -> None:
    domain = Domain()
    in_force = settle_knee(domain, SHORT_CYCLE)

    assert domain.throttle.knee == pytest.approx(in_force * (1 + KNEE_MARGIN))


def test_knee_after_short_cycle_at_raised_delay() -> None:
    domain = Domain()
    in_force = settle_knee(domain, SHORT_CYCLE - 1)

    assert domain.throttle.knee == pytest.approx(in_force * BACKOFF_FACTOR)


def test_knee_after_short_descent_bisects_range() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED)
    for _ in range(10):
        domain.end_attempt()
    in_force = domain.delay
    domain.end_attempt(Outcome.THROTTLED)

    # Responses succeeded at 1 s, the start delay, and the pace throttled at 0.107 s.
    assert in_force == pytest.approx(RULES.start_delay * (1 - FAST_RECOVERY) ** 10)
    assert domain.throttle.knee == pytest.approx(math.sqrt(in_force * RULES.start_delay))
    assert domain.delay == domain.throttle.knee


def test_knee_kept_without_success_since_raise() -> None:
    domain = Domain()
    settle_knee(domain, SHORT_CYCLE)
    knee = domain.throttle.knee
    domain.end_attempt(Outcome.THROTTLED)

    assert domain.throttle.knee == knee
    assert domain.delay > knee


def test_success_lowers_delay_to_knee_then_probes() -> None:
    domain = Domain()
    settle_knee(domain, SHORT_CYCLE)
    knee = domain.throttle.knee
    raised = domain.delay

    domain.end_attempt()
    assert domain.delay == pytest.approx(raised * (1 - FAST_RECOVERY))
    for _ in range(30):
        domain.end_attempt()
        if domain.delay == knee:
            break
    assert domain.delay == knee

    domain.end_attempt()
    step = min(PROBE_MAX_STEP, 0.01 * knee)
    assert domain.delay == pytest.approx(knee * (1 - step))


def test_probing_lowers_delay_about_one_percent_per_second() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED)
    domain.throttle.knee = 10.0
    domain.throttle.rate_delay = 0.2
    expected = 0.2
    for _ in range(50):
        domain.end_attempt(advance=0.2)
        expected *= 1 - min(PROBE_MAX_STEP, PROBE_RATE * expected)

    assert domain.delay == pytest.approx(expected)
    # 50 responses about 0.2 s apart: about 10 s of crawling, 1% a second.
    assert 0.2 * 0.89 < domain.delay < 0.2 * 0.92


def test_responses_to_earlier_attempts_ignored() -> None:
    domain = Domain()
    before = domain.now
    domain.end_attempt(Outcome.THROTTLED)
    raised = domain.delay

    assert domain.end_attempt(started=before) is None
    assert domain.delay == raised
    assert domain.throttle.successes_since_raise == 0


def test_failures_leave_throttled_delay() -> None:
    domain = Domain()
    domain.end_attempt(Outcome.THROTTLED)
    raised = domain.delay
    for _ in range(20):
        domain.end_attempt(Outcome.FAILURE, latency=0.01)

    assert domain.delay == raised


def test_flaky_host_does_not_drift_to_max() -> None:
    # 40% of attempts fail fast with 503 or time out after 5 s; the rest respond
    # in 0.1 s. Neither kind of failure raises the delay.
    domain = Domain()
    rng = random.Random(3)
    delays = []
    for _ in range(1000):
        roll = rng.random()
        if roll < 0.2:
            domain.end_attempt(Outcome.FAILURE, latency=0.005)
        elif roll < 0.4:
            domain.end_attempt(Outcome.FAILURE, latency=5.0)
        else:
            domain.end_attempt(latency=0.1)
        delays.append(domain.delay)

    assert max(delays) < RULES.max_delay
    assert sum(delay > 0 for delay in delays) < 100


# Rule 6: rate-limit headers


def test_rate_limit_spreads_remaining_over_window() -> None:
    domain = Domain()
    adjustment = domain.end_attempt(rate_limit=RateLimit(limit=10, remaining=3, reset=4.0))

    assert adjustment.new_delay == pytest.approx(1.0)
    assert adjustment.reason == "rate_limit"


def test_rate_limit_hint_expires_at_reset() -> None:
    domain = Domain()
    domain.end_attempt(rate_limit=RateLimit(limit=10, remaining=1, reset=2.0), advance=0)
    assert domain.delay == pytest.approx(1.0)

    domain.end_attempt(advance=2.5)
    assert domain.delay == 0.0


def test_rate_limit_remaining_zero_pauses_until_reset() -> None:
    domain = Domain()
    adjustment = domain.end_attempt(rate_limit=RateLimit(limit=10, remaining=0, reset=7.0))

    assert adjustment.pause_until == pytest.approx(domain.now + 7.0)
    assert adjustment.new_delay == 0.0
    assert adjustment.reason == "rate_limit"


def test_rate_limit_below_min_delay_paces() -> None:
    domain = Domain()
    adjustment = domain.throttle.record(
        RULES,
        domain.now,
        outcome=Outcome.SUCCESS,
        latency=0.05,
        started=domain.now - 0.05,
        rate_limit=RateLimit(limit=4, remaining=3, reset=1.0),
        concurrency=8,
    )

    # Up to 8 responses per 0.05 s unpaced, against the 4 per second allowed.
    assert adjustment.new_delay == pytest.approx(0.25)
    assert adjustment.reason == "rate_limit"


def test_rate_limit_ignored_when_slower_unpaced() -> None:
    domain = Domain()
    adjustment = domain.throttle.record(
        RULES,
        domain.now,
        outcome=Outcome.SUCCESS,
        latency=0.3,
        started=domain.now - 0.3,
        rate_limit=RateLimit(limit=1000, remaining=99, reset=1.0),
        concurrency=2,
    )

    # Up to 2 responses per 0.3 s unpaced, against the 100 per second allowed.
    assert adjustment is None
    assert domain.delay == 0.0


@pytest.mark.parametrize(
    "rate_limit",
    [
        RateLimit(limit=None, remaining=None, reset=None),
        RateLimit(limit=10, remaining=5, reset=None),
        RateLimit(limit=10, remaining=None, reset=3.0),
        RateLimit(limit=10, remaining=0, reset=0.0),
        RateLimit(limit=10, remaining=200, reset=1.0),
    ],
)
def test_rate_limit_without_wait_changes_nothing(rate_limit: RateLimit) -> None:
    domain = Domain()
    assert domain.end_attempt(rate_limit=rate_limit) is None
    assert domain.delay == 0.0


# Crawl-delay and the latency sketch


@pytest.mark.parametrize(
    ("crawl_delay", "floor"),
    [(None, 0.0), (0.0, 0.0), (2.5, 2.5), (100.0, 10.0), (-1.0, 0.0), (math.inf, 0.0)],
)
def test_crawl_delay_floor_bounded(crawl_delay: float | None, floor: float) -> None:
    assert crawl_delay_floor(crawl_delay, 10.0) == floor


def test_sketch_quantiles_within_relative_error() -> None:
    sketch = LatencySketch()
    latencies = [0.01 * n for n in range(1, 1001)]
    random.Random(5).shuffle(latencies)
    for latency in latencies:
        sketch.add(latency)

    p50, p95 = sketch.quantile(0.5), sketch.quantile(0.95)
    assert p50 is not None
    assert p95 is not None
    assert p50 == pytest.approx(5.0, rel=0.03)
    assert p95 == pytest.approx(9.5, rel=0.03)
    assert sketch.count == 1000


def test_sketch_empty_and_invalid_values() -> None:
    sketch = LatencySketch()
    sketch.add(math.nan)
    sketch.add(-1.0)
    assert sketch.quantile(0.5) is None

    sketch.add(0.0)
    low = sketch.quantile(0.5)
    assert low is not None
    assert low < 1e-3


# Convergence on a token bucket


@dataclass
class BucketRun:
    """One domain behind the registry's admission, against the fault site's token
    bucket, on a simulated clock. Responses take ``latency`` seconds, and a 429
    pauses the domain for ``retry_after`` seconds as the observer does."""

    rate: float
    burst: int
    penalize: bool
    retry_after: float
    latency: float = 0.01
    events: list[tuple[float, int, str, Any]] = field(default_factory=list)
    responses: list[tuple[float, bool]] = field(default_factory=list)

    def run(self, seconds: float) -> None:
        registry = DomainRegistry(CircuitConfig(open_jitter=0.0), rng=random.Random(1))
        state = registry.get("limited.test")
        throttle = DomainThrottle()
        bucket = TokenBucket(self.rate, self.burst, self.penalize)
        sequence = 0
        woken: set[float] = set()

        def schedule(when: float, kind: str, data: Any = None) -> None:
            nonlocal sequence
            sequence += 1
            heapq.heappush(self.events, (when, sequence, kind, data))

        def admit(now: float) -> None:
            while True:
                verdict = registry.verdict(state, now, 8, 8)
                if verdict.decision is not Decision.ADMIT:
                    if verdict.wake_at is not None and verdict.wake_at not in woken:
                        woken.add(verdict.wake_at)
                        schedule(verdict.wake_at, "wake")
                    return
                suspect = registry.admit(state, now)
                schedule(now + self.latency, "response", (now, suspect))

        admit(0.0)
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if now > seconds:
                break
            if kind == "response":
                started, suspect = data
                served = bucket.take(now)
                registry.finish(state, suspect=suspect)
                self.responses.append((now, served))
                if served:
                    registry.record_success(state, now, probe=False)
                else:
                    registry.pause(state, now + self.retry_after)
                outcome = Outcome.SUCCESS if served else Outcome.THROTTLED
                adjustment = throttle.record(
                    RULES, now, outcome=outcome, latency=self.latency, started=started
                )
                if adjustment is not None:
                    state.throttle_delay = adjustment.new_delay
                    if adjustment.not_before is not None:
                        state.next_admit_at = max(state.next_admit_at, adjustment.not_before)
            admit(now)

    def steady(self, since: float) -> tuple[float, float]:
        """Return the throughput as a share of the rate, and the 429 share, since ``since``."""
        outcomes = [served for when, served in self.responses if when >= since]
        end = self.responses[-1][0]
        return sum(outcomes) / (end - since) / self.rate, outcomes.count(False) / len(outcomes)


@pytest.mark.parametrize(
    ("rate", "burst", "penalize", "retry_after"),
    [
        (5, 5, True, 1.0),
        (5, 5, False, 1.0),
        (4, 4, False, 2.0),
        (2, 2, True, 1.0),
        (10, 5, True, 1.0),
        (20, 20, False, 1.0),
        (0.5, 2, True, 3.0),
    ],
)
def test_converges_on_token_bucket(
    rate: float, burst: int, penalize: bool, retry_after: float
) -> None:
    run = BucketRun(rate, burst, penalize, retry_after)
    run.run(seconds=300.0)
    throughput, throttled_share = run.steady(since=60.0)

    assert throughput >= 0.8
    assert throttled_share <= 0.05


def test_fast_429s_slow_down_after_few() -> None:
    run = BucketRun(5, 5, True, 1.0)
    run.run(seconds=60.0)
    rejected = [when for when, served in run.responses if not served]

    # The first burst at full concurrency, then a few while the pace settles.
    assert len([when for when in rejected if when < 30.0]) <= 12
    late = [when for when, served in run.responses if when > 20.0]
    gaps = [b - a for a, b in itertools.pairwise(late)]
    # Tokens stored during a Retry-After pause, and probing until the next 429,
    # allow gaps a little under the interval.
    assert statistics.median(gaps) >= 0.9 / 5
    assert min(gaps) >= 0.8 / 5


# The extension on a real runtime


#: Epoch seconds the extension's wall clock reads in these tests.
WALL_CLOCK = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_engine_crawler(settings: dict[str, Any]) -> Any:
    """Return a crawler whose engine keys domains by hostname, as Scrapy's does."""
    crawler = get_crawler(settings_dict=settings)
    crawler.engine = SimpleNamespace(  # type: ignore[assignment]
        downloader=SimpleNamespace(
            total_concurrency=16, get_slot_key=lambda request: urlsplit(request.url).hostname
        )
    )
    return crawler


class Setup:
    """An :class:`AdaptiveThrottle` on a real runtime with a fake clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]) -> None:
        self.crawler = fake_engine_crawler(settings)
        self.clock = FakeClock()
        self.runtime = Runtime(self.crawler, clock=self.clock, rng=random.Random(1))
        setattr(self.crawler, runtime_module._ATTRIBUTE, self.runtime)
        self.wakes: list[float] = []
        monkeypatch.setattr(self.runtime, "wake_at", self.wakes.append)
        self.throttle = AdaptiveThrottle(self.crawler, wall_clock=lambda: WALL_CLOCK)

    def attempt(
        self,
        url: str = "http://slow.test/page",
        status: int | None = 200,
        *,
        latency: float = 0.01,
        category: Category | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        meta: dict[str, Any] | None = None,
        exception: BaseException | None = None,
        advance: float = 0.5,
    ) -> Attempt:
        self.clock.now += advance
        request = Request(url, meta=meta or {})
        track = Track(self.runtime.domain_key(request), True, latency=latency)
        response = None
        if status is not None:
            response = TextResponse(url, status=status, headers=headers, body=body, request=request)
        attempt = Attempt(track, request, category, response=response, exception=exception)
        self.throttle.on_attempt(attempt)
        return attempt

    def state(self, key: str = "slow.test") -> Any:
        return self.runtime.domain(key)


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Setup]:
    def make(**settings: Any) -> Setup:
        return Setup(monkeypatch, settings)

    return make


def test_extension_switched_off() -> None:
    crawler = get_crawler(settings_dict={"RESILIENCE_THROTTLE_ENABLED": False})
    with pytest.raises(NotConfigured):
        AdaptiveThrottle(crawler)


def test_extension_listens_and_extends_report(setup: Callable[..., Setup]) -> None:
    s = setup()
    assert s.throttle.on_attempt in s.runtime.attempt_listeners
    assert s.throttle.extend_report in s.runtime.report_extenders


def test_throttled_response_sets_registry_delay(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.attempt(status=429, category=Category.THROTTLED, headers={"Retry-After": "1"})
    state = s.state()

    assert state.throttle_delay == 1.0
    assert state.delay == 1.0
    assert state.next_admit_at == pytest.approx(s.clock.now - 0.01 + 1.0)
    stats = s.crawler.stats
    assert stats is not None
    assert stats.get_value("resilience/throttle/raised") == 1
    assert stats.get_value("resilience/throttle/adjustments") == 1
    assert stats.get_value("resilience/throttle/paced") == 1
    assert stats.get_value("resilience/throttle/max_delay") == 1.0


def test_server_errors_leave_delay(setup: Callable[..., Setup]) -> None:
    s = setup()
    for _ in range(20):
        s.attempt(status=503, category=Category.SERVER)
        s.attempt(status=None, category=Category.NETWORK, exception=ConnectionRefusedError())

    assert s.state().throttle_delay == 0.0
    stats = s.crawler.stats
    assert stats is not None
    assert stats.get_value("resilience/throttle/adjustments") is None


def test_ignored_exception_changes_nothing(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.attempt(status=None, latency=50.0, exception=IgnoreRequest())

    assert s.throttle.domains == {}


def test_latency_delay_reaches_registry(setup: Callable[..., Setup]) -> None:
    s = setup()
    for _ in range(3):
        s.attempt(latency=1.5)

    assert s.state().throttle_delay == pytest.approx(1.5)


def test_browser_latency_can_be_left_out(setup: Callable[..., Setup]) -> None:
    s = setup(RESILIENCE_THROTTLE_BROWSER_LATENCY=False)
    for _ in range(3):
        s.attempt(latency=3.0, meta={"playwright": True})
    assert s.state().throttle_delay == 0.0

    s.attempt(latency=3.0)
    assert s.state().throttle_delay == pytest.approx(3.0)


def test_rate_limit_headers_set_pace(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.attempt(headers={"RateLimit-Remaining": "3", "RateLimit-Reset": "8"})

    assert s.state().throttle_delay == pytest.approx(2.0)


def test_x_rate_limit_zero_pauses_domain(setup: Callable[..., Setup]) -> None:
    s = setup()
    epoch_reset = str(int(WALL_CLOCK) + 30)
    s.attempt(headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": epoch_reset})
    state = s.state()

    assert state.pause_until == pytest.approx(s.clock.now + 30)
    assert s.wakes == [state.pause_until]
    stats = s.crawler.stats
    assert stats is not None
    assert stats.get_value("resilience/throttle/rate_limit_paused") == 1


def test_rate_limit_pause_capped_as_retry_after(setup: Callable[..., Setup]) -> None:
    s = setup(RESILIENCE_RETRY_AFTER_MAX=60)
    s.attempt(headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "3600"})

    assert s.state().pause_until == pytest.approx(s.clock.now + 60)


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Remaining": "many", "RateLimit-Reset": "soon"},
        {"RateLimit-Remaining": "-1", "RateLimit-Reset": "nan"},
        {"X-RateLimit-Remaining": "1e3", "X-RateLimit-Reset": "\x00\xff"},
        {"RateLimit": "garbage;;;=,,", "RateLimit-Policy": "q=;w="},
    ],
)
def test_garbage_rate_limit_headers_ignored(
    setup: Callable[..., Setup], headers: dict[str, str]
) -> None:
    s = setup()
    s.attempt(headers=headers)

    state = s.state()
    assert state.throttle_delay == 0.0
    assert state.pause_until == 0.0


ROBOTS = b"User-agent: *\nCrawl-delay: 2\n\nUser-agent: politebot\nCrawl-delay: 4\n"


def test_crawl_delay_raises_floor(setup: Callable[..., Setup]) -> None:
    s = setup(ROBOTSTXT_OBEY=True)
    s.attempt("http://slow.test/robots.txt", body=ROBOTS, latency=0.25)

    state = s.state()
    assert state.floor_delay == 2.0
    # The page waiting for robots.txt went first; the next waits 2 s after it.
    assert state.next_admit_at == pytest.approx(s.clock.now - 0.25 + 2.0)
    stats = s.crawler.stats
    assert stats is not None
    assert stats.get_value("resilience/throttle/crawl_delay") == 1


def test_crawl_delay_for_robots_user_agent(setup: Callable[..., Setup]) -> None:
    s = setup(ROBOTSTXT_OBEY=True, ROBOTSTXT_USER_AGENT="politebot")
    s.attempt("http://slow.test/robots.txt", body=ROBOTS)

    assert s.state().floor_delay == 4.0


def test_crawl_delay_bounded_by_max_delay(setup: Callable[..., Setup]) -> None:
    s = setup(ROBOTSTXT_OBEY=True, RESILIENCE_THROTTLE_MAX_DELAY=1.5)
    s.attempt("http://slow.test/robots.txt", body=b"User-agent: *\nCrawl-delay: 3600\n")

    assert s.state().floor_delay == 1.5


@pytest.mark.parametrize(
    ("settings", "url", "status", "body"),
    [
        ({}, "http://slow.test/robots.txt", 200, ROBOTS),
        ({"ROBOTSTXT_OBEY": True}, "http://slow.test/robots.txt", 404, ROBOTS),
        ({"ROBOTSTXT_OBEY": True}, "http://slow.test/page", 200, ROBOTS),
        ({"ROBOTSTXT_OBEY": True}, "http://slow.test/robots.txt", 200, b"Crawl-delay: soon\n"),
        ({"ROBOTSTXT_OBEY": True}, "http://slow.test/robots.txt", 200, b"\xff\xfe\x00garbage"),
    ],
)
def test_crawl_delay_ignored(
    setup: Callable[..., Setup], settings: dict[str, Any], url: str, status: int, body: bytes
) -> None:
    s = setup(**settings)
    s.attempt(url, status=status, body=body)

    assert s.state().floor_delay == 0.0


def test_crawl_delay_survives_eviction(setup: Callable[..., Setup]) -> None:
    s = setup(ROBOTSTXT_OBEY=True, RESILIENCE_REGISTRY_MAX_DOMAINS=1)
    s.attempt("http://slow.test/robots.txt", body=ROBOTS)
    s.attempt("http://other.test/page")
    assert s.runtime.registry.peek("slow.test") is None

    s.attempt("http://slow.test/page")
    assert s.state().floor_delay == 2.0


def test_report_fields(setup: Callable[..., Setup]) -> None:
    s = setup()
    for latency in (0.1, 0.2, 0.3, 0.4, 2.0):
        s.attempt(latency=latency)
    state = s.state()
    state.attempts = 5
    state.floor_delay = 0.75
    fields = domain_fields(s.runtime, state)

    assert fields["latency_p50"] == pytest.approx(0.3, rel=0.03)
    assert fields["latency_p95"] == pytest.approx(2.0, rel=0.03)
    assert fields["delay"] == 0.75


def test_report_fields_of_domain_never_attempted(setup: Callable[..., Setup]) -> None:
    s = setup()
    fields = domain_fields(s.runtime, s.state("quiet.test"))

    assert fields["latency_p50"] is None
    assert fields["latency_p95"] is None
    assert fields["delay"] == 0.0


def throttle_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == THROTTLE_LOGGER]


def test_debug_logs_each_adjustment(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup(RESILIENCE_THROTTLE_DEBUG=True)
    with caplog.at_level(logging.INFO, logger=THROTTLE_LOGGER):
        s.attempt(status=429, category=Category.THROTTLED, latency=0.02)

    [record] = throttle_records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "Throttle delay of slow.test: 0.000s -> 1.000s (throttled; latency 0.020s, median 0.020s)"
    )


def test_adjustments_quiet_without_debug(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup()
    with caplog.at_level(logging.INFO, logger=THROTTLE_LOGGER):
        s.attempt(status=429, category=Category.THROTTLED)

    assert throttle_records(caplog) == []


def test_small_changes_not_counted_as_adjustments(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup(RESILIENCE_THROTTLE_DEBUG=True)
    with caplog.at_level(logging.INFO, logger=THROTTLE_LOGGER):
        s.attempt(status=429, category=Category.THROTTLED)
        for _ in range(300):
            s.attempt(advance=0.3)

    messages = [record.getMessage() for record in throttle_records(caplog)]
    stats = s.crawler.stats
    assert stats is not None
    assert stats.get_value("resilience/throttle/adjustments") == len(messages)
    # The delay changed at each of the 300 responses.
    assert 10 < len(messages) < 100
    for message in messages[1:]:
        old, new = (float(value) for value in re.findall(r"(\d+\.\d+)s", message)[:2])
        assert abs(new - old) >= 0.05 * old


def test_released_domain_wakes_hold(setup: Callable[..., Setup]) -> None:
    s = setup()
    for _ in range(LATENCY_WINDOW):
        s.attempt(latency=1.0)
    s.wakes.clear()
    while s.state().throttle_delay > 0:
        s.attempt(latency=0.01)

    assert s.wakes == [s.clock.now]


def test_records_of_evicted_domains_forgotten(setup: Callable[..., Setup]) -> None:
    s = setup(RESILIENCE_REGISTRY_MAX_DOMAINS=10)
    for number in range(200):
        s.attempt(f"http://host{number}.test/page")

    assert len(s.runtime.registry) == 10
    assert len(s.throttle.domains) <= 10 * 3 // 2 + 64 + 1


# resilience_dont_throttle


def paced_registry() -> tuple[DomainRegistry, Any]:
    registry = DomainRegistry(CircuitConfig(open_jitter=0.0), rng=random.Random(1))
    state = registry.get("paced.test")
    state.throttle_delay = 5.0
    registry.admit(state, 0.0)
    registry.finish(state, suspect=False)
    return registry, state


def test_verdict_unpaced_ignores_delay() -> None:
    registry, state = paced_registry()

    assert registry.verdict(state, 1.0, 8, 8).reason == "paced"
    assert registry.verdict(state, 1.0, 8, 8, paced=False).decision is Decision.ADMIT


def test_unpaced_admission_keeps_next_admission_time() -> None:
    registry, state = paced_registry()
    due = state.next_admit_at
    for _ in range(3):
        registry.admit(state, 1.0, paced=False)

    assert state.next_admit_at == due
    assert state.inflight == 3
    assert registry.verdict(state, 1.0, 8, 8, paced=False).decision is Decision.ADMIT


def test_unpaced_request_still_waits_for_pause() -> None:
    registry, state = paced_registry()
    registry.pause(state, 30.0)

    assert registry.verdict(state, 1.0, 8, 8, paced=False).reason == "paused"


def test_middleware_admits_dont_throttle_request(monkeypatch: pytest.MonkeyPatch) -> None:
    crawler = fake_engine_crawler({})
    clock = FakeClock()
    runtime = Runtime(crawler, clock=clock, rng=random.Random(1))
    setattr(crawler, runtime_module._ATTRIBUTE, runtime)
    monkeypatch.setattr(runtime, "wake_at", lambda when: None)
    middleware = CircuitBreakerMiddleware(crawler)
    runtime.domain("paced.test").throttle_delay = 5.0

    def scheduled(meta: dict[str, Any]) -> Request:
        return Request("http://paced.test/page", meta={"_resilience": {"scheduled": True}, **meta})

    assert middleware.process_request(scheduled({})) is None
    second = scheduled({})
    assert middleware.process_request(second) is second
    for _ in range(3):
        assert middleware.process_request(scheduled({DONT_THROTTLE: True})) is None
    assert runtime.domain("paced.test").inflight == 4


# Settings and the add-on


def test_settings_defaults() -> None:
    from scrapy_resilience.settings import load_config

    throttle = load_config(Settings()).throttle
    assert throttle.rules == ThrottleRules(
        target_concurrency=1.0, min_delay=0.5, start_delay=1.0, max_delay=10.0
    )
    assert throttle.debug is False
    assert throttle.browser_latency is True


def test_addon_adds_extension() -> None:
    settings = Settings()
    Addon().update_settings(settings)

    assert settings.getdict("EXTENSIONS")[AdaptiveThrottle] == 500


def test_addon_still_rejects_autothrottle() -> None:
    settings = Settings({"AUTOTHROTTLE_ENABLED": True})
    with pytest.raises(InvalidSettingError, match="RESILIENCE_THROTTLE_ENABLED = False"):
        Addon().update_settings(settings)


def test_circuit_off_warns_throttle_does_nothing(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup()
    with caplog.at_level(logging.WARNING, logger=THROTTLE_LOGGER):
        s.throttle.spider_opened(SimpleNamespace())  # type: ignore[arg-type]

    [record] = throttle_records(caplog)
    assert "RESILIENCE_CIRCUIT_ENABLED = False" in record.getMessage()


def test_html_response_reaches_rules(setup: Callable[..., Setup]) -> None:
    s = setup()
    request = Request("http://slow.test/page")
    response = HtmlResponse(request.url, status=429, request=request)
    track = Track("slow.test", True, latency=0.05)
    s.throttle.on_attempt(Attempt(track, request, Category.THROTTLED, response=response))

    assert s.state().throttle_delay == 1.0
