"""The adaptive throttle: per-domain delays that follow response times and
slow down when a site throttles.

The extension listens to every attempt the observer records
(``runtime.attempt_listeners``), applies the rules of
:mod:`scrapy_resilience.core.throttle`, and writes each domain's delay to
``DomainState.throttle_delay`` in the registry. It never touches Scrapy's slot
delays: admission paces every domain whose delay is above 0, one request in
flight at a time, outside the downloader.

It also reads the servers' hints: rate-limit headers on every response, and
the ``Crawl-delay`` of each robots.txt the crawl downloads when
``ROBOTSTXT_OBEY`` is on, which raises the domain's floor delay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from protego import Protego
from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_resilience.core.classify import Category
from scrapy_resilience.core.headers import RateLimit, parse_rate_limit
from scrapy_resilience.core.throttle import (
    Adjustment,
    DomainThrottle,
    LatencySketch,
    Outcome,
    crawl_delay_floor,
)
from scrapy_resilience.runtime import Runtime
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self

    from scrapy_resilience.core.registry import DomainState
    from scrapy_resilience.runtime import Attempt

logger = logging.getLogger(__name__)

#: Meta key of scrapy-playwright that sends a request through the browser.
PLAYWRIGHT_META_KEY = "playwright"

ROBOTS_PATH = "/robots.txt"

#: Smallest change of a domain's delay, relative to the value last counted,
#: that counts as an adjustment in stats and logs. While probing, the delay
#: changes by a fraction of a percent at every response.
REPORTED_CHANGE = 0.05


class DomainRecord:
    """The throttle's state of one domain: its delay rules, its latency
    quantiles for the report, and the floor its robots.txt ``Crawl-delay`` set."""

    __slots__ = ("crawl_delay", "reported_delay", "sketch", "throttle")

    def __init__(self) -> None:
        self.throttle = DomainThrottle()
        self.sketch = LatencySketch()
        self.crawl_delay = 0.0
        self.reported_delay = 0.0


class AdaptiveThrottle:
    """Set each domain's pacing delay from its latency, throttled responses and
    server hints."""

    def __init__(self, crawler: Crawler, *, wall_clock: Callable[[], float] = time.time) -> None:
        if not get_bool(crawler.settings, "RESILIENCE_THROTTLE_ENABLED"):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        config = self.runtime.config
        self.rules = config.throttle.rules
        self.debug = config.throttle.debug
        self.browser_latency = config.throttle.browser_latency
        self.retry_after_max = config.retry.retry_after_max
        self.wall_clock = wall_clock
        settings = crawler.settings
        self.robots_obey = settings.getbool("ROBOTSTXT_OBEY")
        self.robots_user_agent: str | None = settings.get("ROBOTSTXT_USER_AGENT") or None
        self.default_user_agent = str(settings.get("USER_AGENT") or "*")
        self.domains: dict[str, DomainRecord] = {}

        self.runtime.attempt_listeners.append(self.on_attempt)
        self.runtime.report_extenders.append(self.extend_report)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def spider_opened(self, spider: Spider) -> None:
        if not self.runtime.circuit_active:
            logger.warning(
                "The adaptive throttle sets delays that only the circuit breaker's admission "
                "step applies, so with RESILIENCE_CIRCUIT_ENABLED = False no domain is paced. "
                "Set RESILIENCE_THROTTLE_ENABLED = False to silence this warning",
                extra={"spider": spider},
            )

    # Attempts

    def on_attempt(self, attempt: Attempt) -> None:
        """Apply one attempt to its domain's delay (see ``runtime.attempt_listeners``)."""
        if attempt.category is None and attempt.exception is not None:
            # IgnoreRequest or a browser fault tells nothing about the site.
            return

        runtime = self.runtime
        now = runtime.clock()
        started = now - attempt.latency
        state = runtime.domain(attempt.key)
        record = self._record(attempt.key)
        # The registry evicts idle domains beyond RESILIENCE_REGISTRY_MAX_DOMAINS,
        # and a domain seen again gets a new state without the throttle's values.
        state.floor_delay = max(state.floor_delay, record.crawl_delay)
        record.sketch.add(attempt.latency)
        if attempt.response is not None:
            self._read_crawl_delay(attempt.request, attempt.response, state, started)

        adjustment = record.throttle.record(
            self.rules,
            now,
            outcome=_outcome(attempt.category),
            latency=attempt.latency if self._counts_latency(attempt.request) else None,
            started=started,
            floor=state.floor_delay,
            rate_limit=self._rate_limit(attempt.response),
            concurrency=runtime.per_domain_limit(attempt.key),
        )
        if adjustment is not None:
            self._apply(state, record, adjustment, attempt)
        else:
            state.throttle_delay = record.throttle.delay

    def _counts_latency(self, request: Request) -> bool:
        return self.browser_latency or not request.meta.get(PLAYWRIGHT_META_KEY)

    def _rate_limit(self, response: Response | None) -> RateLimit | None:
        if response is None:
            return None
        headers = response.headers
        return parse_rate_limit(
            lambda name: b", ".join(headers.getlist(name)) or None, self.wall_clock()
        )

    def _apply(
        self, state: DomainState, record: DomainRecord, adjustment: Adjustment, attempt: Attempt
    ) -> None:
        runtime = self.runtime
        stats = runtime.stats
        state.throttle_delay = adjustment.new_delay
        raised = adjustment.not_before is not None
        if adjustment.not_before is not None:
            stats.inc_value("resilience/throttle/raised")
            if state.delay > 0:
                # The raise applies to the very next admission, not only to the
                # one after it, which the previous delay already scheduled.
                state.next_admit_at = max(state.next_admit_at, adjustment.not_before)
        if adjustment.pause_until is not None:
            self._pause(state, adjustment.pause_until)
        if not adjustment.changed:
            return

        stats.max_value("resilience/throttle/max_delay", round(adjustment.new_delay, 3))
        if adjustment.old_delay == 0:
            stats.inc_value("resilience/throttle/paced")
        elif adjustment.new_delay == 0:
            # Concurrency comes back at once rather than at the next timer.
            runtime.wake_soon()
        if raised or _reportable(record.reported_delay, adjustment.new_delay):
            stats.inc_value("resilience/throttle/adjustments")
            self._log(state.key, record.reported_delay, adjustment, attempt)
            record.reported_delay = adjustment.new_delay

    def _pause(self, state: DomainState, until: float) -> None:
        """Pause the domain until a rate-limit reset, capped at
        ``RESILIENCE_RETRY_AFTER_MAX`` as ``Retry-After`` pauses are."""
        runtime = self.runtime
        until = min(until, runtime.clock() + self.retry_after_max)
        if runtime.registry.pause(state, until):
            runtime.stats.inc_value("resilience/throttle/rate_limit_paused")
            runtime.wake_at(until)

    def _log(self, key: str, old_delay: float, adjustment: Adjustment, attempt: Attempt) -> None:
        level = logging.INFO if self.debug else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        median = adjustment.latency
        logger.log(
            level,
            "Throttle delay of %(domain)s: %(old).3fs -> %(new).3fs (%(reason)s; "
            "latency %(latency).3fs, median %(median)s)",
            {
                "domain": key,
                "old": old_delay,
                "new": adjustment.new_delay,
                "reason": adjustment.reason,
                "latency": attempt.latency,
                "median": "-" if median is None else f"{median:.3f}s",
            },
            extra={"spider": self.crawler.spider},
        )

    # robots.txt

    def _read_crawl_delay(
        self, request: Request, response: Response, state: DomainState, started: float
    ) -> None:
        """Raise the domain's floor to its robots.txt ``Crawl-delay``, capped at the
        maximum delay. ``started`` is when the robots.txt attempt started."""
        if not self.robots_obey or response.status != 200:
            return
        if urlsplit(request.url).path != ROBOTS_PATH:
            return

        user_agent = self.robots_user_agent or _header_text(request, "User-Agent")
        try:
            parser = Protego.parse(response.body.decode("utf-8", errors="ignore"))
            crawl_delay = parser.crawl_delay(user_agent or self.default_user_agent)
        # A robots.txt is untrusted input. Protego is lenient, but whatever it
        # raises must not stop the crawl.
        except Exception as error:
            logger.debug(
                "Failed to parse the robots.txt of %(domain)s, so its Crawl-delay is ignored: "
                "%(error)r",
                {"domain": state.key, "error": error},
                extra={"spider": self.crawler.spider},
            )
            return

        floor = crawl_delay_floor(crawl_delay, self.rules.max_delay)
        record = self._record(state.key)
        record.crawl_delay = max(record.crawl_delay, floor)
        if floor <= state.floor_delay:
            return
        state.floor_delay = floor
        # The page request that made RobotsTxtMiddleware fetch robots.txt was
        # admitted just before, and the next one must wait the new floor too.
        state.next_admit_at = max(state.next_admit_at, started + floor)
        self.runtime.stats.inc_value("resilience/throttle/crawl_delay")
        logger.log(
            logging.INFO if self.debug else logging.DEBUG,
            "Crawl-delay of %(domain)s: pacing it at least %(floor)gs apart (its robots.txt "
            "sets %(crawl_delay)gs, and RESILIENCE_THROTTLE_MAX_DELAY is %(max)gs)",
            {
                "domain": state.key,
                "floor": floor,
                "crawl_delay": crawl_delay,
                "max": self.rules.max_delay,
            },
            extra={"spider": self.crawler.spider},
        )

    # The report

    def extend_report(self, key: str, fields: dict[str, Any]) -> None:
        """Add the latency quantiles and the final delay to one domain's report
        entry (see ``runtime.report_extenders``)."""
        record = self.domains.get(key)
        sketch = record.sketch if record is not None else LatencySketch()
        state = self.runtime.registry.peek(key)
        fields["latency_p50"] = _rounded(sketch.quantile(0.5))
        fields["latency_p95"] = _rounded(sketch.quantile(0.95))
        fields["delay"] = round(state.delay, 3) if state is not None else 0.0

    # Domains

    def _record(self, key: str) -> DomainRecord:
        record = self.domains.get(key)
        if record is None:
            self._forget_evicted()
            record = self.domains[key] = DomainRecord()
        return record

    def _forget_evicted(self) -> None:
        """Drop the records of domains the registry evicted, so memory stays
        bounded by ``RESILIENCE_REGISTRY_MAX_DOMAINS``.

        Runs when the records outnumber the registry's domains by half, so its
        cost spreads over the domains added since the last run.
        """
        registry = self.runtime.registry
        if len(self.domains) > len(registry) * 3 // 2 + 64:
            registry.forget_evicted(self.domains)


def _reportable(reported: float, delay: float) -> bool:
    """Return whether a delay differs enough from the one last counted."""
    if (reported == 0) != (delay == 0):
        return True
    return abs(delay - reported) >= REPORTED_CHANGE * reported


def _outcome(category: Category | None) -> Outcome:
    if category is None:
        return Outcome.SUCCESS
    if category is Category.THROTTLED:
        return Outcome.THROTTLED
    return Outcome.FAILURE


def _header_text(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
