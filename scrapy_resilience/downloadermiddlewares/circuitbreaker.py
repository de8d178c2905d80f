"""Admission and observation: the two ends of the downloader middleware chain.

:class:`CircuitBreakerMiddleware` (priority 75, after Scrapy's downloader
``OffsiteMiddleware`` and before ``RobotsTxtMiddleware``) decides whether a
request may enter the downloader now. A scheduler-originated request that may
not is returned to the engine and waits in the hold, so it never occupies
``CONCURRENT_REQUESTS``; a request downloaded directly (robots.txt, media
pipelines) is never held, and fails fast with
:exc:`~scrapy_resilience.CircuitOpenError` when its domain is unavailable.

:class:`AttemptObserverMiddleware` (priority 990, nearest the download
handler) records every attempt that reaches the handler exactly once, whatever
later middlewares do with its outcome, and re-checks the circuit just before
the attempt starts.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.misc import load_object

from scrapy_resilience.core.classify import Category, classify_exception, classify_status
from scrapy_resilience.core.headers import cap_retry_after, parse_retry_after
from scrapy_resilience.core.registry import Decision
from scrapy_resilience.exceptions import CircuitOpenError, InvalidSettingError
from scrapy_resilience.runtime import Attempt, Runtime, Track
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: Meta key that lets a request bypass the circuit breaker and admission.
DONT_CIRCUIT = "resilience_dont_circuit"

#: Meta key that exempts a request from its domain's pacing delay.
DONT_THROTTLE = "resilience_dont_throttle"


class HeldBackError(CircuitOpenError):
    """Raised at the handler for an attempt its domain can no longer take.

    Admission turns it into a hold for scheduler-originated requests; a direct
    download sees it as :exc:`~scrapy_resilience.CircuitOpenError`.
    """


class CircuitBreakerMiddleware:
    """Admit requests per domain: circuit state, pauses, pacing and in-flight bounds."""

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "RESILIENCE_CIRCUIT_ENABLED"):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        self.runtime.circuit_active = True

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_request(self, request: Request, spider: Spider | None = None) -> Request | None:
        runtime = self.runtime
        scheduled = runtime.take_bookkeeping(request)
        if request.meta.get(DONT_CIRCUIT):
            # Not admitted, but the retry middleware still needs its origin.
            runtime.tracks[request] = Track(runtime.domain_key(request), scheduled)
            return None

        key = runtime.domain_key(request)
        state = runtime.domain(key)
        now = runtime.clock()
        paced = not request.meta.get(DONT_THROTTLE)
        verdict = runtime.verdict(state, now, paced=paced)

        if verdict.decision is Decision.ADMIT:
            suspect = runtime.registry.admit(state, now, paced=paced)
            track = Track(key, scheduled, admitted=True, suspect=suspect, probe=verdict.probe)
            runtime.track_admitted(request, track)
            return None

        if verdict.decision is Decision.REJECT:
            self._reject(request, key, verdict.reason)

        if scheduled:
            runtime.hold_later(request, verdict.wake_at or now, verdict.reason)
            runtime.stats.inc_value(f"resilience/admission/held/{verdict.reason}")
            return request

        if verdict.reason == "open":
            self._reject(request, key, "its circuit is open")

        # A direct download is never held: it goes now, counted in flight.
        suspect = runtime.registry.admit(state, now)
        runtime.track_admitted(request, Track(key, scheduled, admitted=True, suspect=suspect))
        return None

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Response:
        self.runtime.finish(request)
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Request | None:
        track = self.runtime.finish(request)
        if isinstance(exception, HeldBackError) and track is not None and track.scheduled:
            self.runtime.hold_later(request, self.runtime.clock(), "held_back")
            return request
        return None

    def _reject(self, request: Request, key: str, reason: str) -> None:
        state = self.runtime.domain(key)
        state.rejected += 1
        self.runtime.stats.inc_value("resilience/circuit/rejected")
        logger.debug(
            "Failing %(request)s: %(domain)s is unavailable (%(reason)s)",
            {"request": request, "domain": key, "reason": reason},
            extra={"spider": self.crawler.spider},
        )
        raise CircuitOpenError(key, reason)


class AttemptObserverMiddleware:
    """Record each attempt's outcome for the circuit, pauses and latency.

    Wired by the add-on nearest the download handler. It also serves the
    hold, which is not optional, so it stays on when the circuit breaker is
    switched off: then it only removes the hold's bookkeeping and records
    attempts, and never holds anything back.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        settings = crawler.settings
        self.retry_http_codes = frozenset(
            int(code) for code in settings.getlist("RETRY_HTTP_CODES")
        )
        self.extra_network = _load_exception_classes(settings.getlist("RETRY_EXCEPTIONS"))
        self.retry_after_max = self.runtime.config.retry.retry_after_max
        # Pause at the first moment the client has the answer, before any
        # middleware runs, so no request can start between receipt and pause.
        crawler.signals.connect(self._response_downloaded, signal=signals.response_downloaded)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        runtime = self.runtime
        track = runtime.tracks.get(request)
        if track is None:
            # Not admitted (bypassed with resilience_dont_circuit, or admission
            # is off): the attempt still counts for the circuit and the report.
            scheduled = runtime.take_bookkeeping(request)
            track = Track(runtime.domain_key(request), scheduled)
            runtime.tracks[request] = track

        state = runtime.domain(track.key)
        now = runtime.clock()
        gated = runtime.circuit_active and track.admitted and not request.meta.get(DONT_CIRCUIT)
        if gated and not runtime.registry.attempt_allowed(state, now, probe=track.probe):
            runtime.finish(request)
            runtime.stats.inc_value("resilience/admission/held_back")
            raise HeldBackError(track.key, "its circuit changed while the request waited")

        runtime.registry.start_attempt(state, probe=track.probe)
        runtime.stats.inc_value("resilience/attempts")
        track.attempt_started = now

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Response:
        track = self._end_attempt(request)
        if track is None:
            return response

        runtime = self.runtime
        state = runtime.domain(track.key)
        has_retry_after = track.retry_after is not None
        category = classify_status(response.status, has_retry_after, self.retry_http_codes)
        if category is None:
            runtime.registry.record_success(state, runtime.clock(), probe=track.probe)
        else:
            runtime.registry.record_failure(state, category, runtime.clock(), probe=track.probe)
            runtime.stats.inc_value(f"resilience/failures/{category.value}")
        runtime.notify_attempt(Attempt(track, request, category, response=response))
        runtime.finish(request)
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> None:
        track = self._end_attempt(request)
        if track is None:
            self.runtime.finish(request)
            return

        runtime = self.runtime
        state = runtime.domain(track.key)
        category = classify_exception(exception, self.extra_network)
        if category is None:
            runtime.registry.record_no_outcome(state, probe=track.probe)
        else:
            runtime.registry.record_failure(state, category, runtime.clock(), probe=track.probe)
            runtime.stats.inc_value(f"resilience/failures/{category.value}")
        runtime.notify_attempt(Attempt(track, request, category, exception=exception))
        runtime.finish(request)

    def _end_attempt(self, request: Request) -> Track | None:
        track = self.runtime.tracks.get(request)
        if track is None or track.attempt_started is None:
            return None
        track.latency = self.runtime.clock() - track.attempt_started
        track.attempt_started = None
        return track

    def _response_downloaded(self, response: Response, request: Request, spider: Spider) -> None:
        track = self.runtime.tracks.get(request)
        if track is None or response.status not in (429, 503):
            return
        track.retry_after = self._retry_after(response, track.key)
        if track.retry_after is None:
            return
        category = classify_status(response.status, True, self.retry_http_codes)
        if category is Category.THROTTLED:
            now = self.runtime.clock()
            self._pause(track.key, now + track.retry_after, track.retry_after)

    def _retry_after(self, response: Response, key: str) -> float | None:
        seconds = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if seconds is None:
            return None
        seconds, capped = cap_retry_after(seconds, self.retry_after_max)
        state = self.runtime.domain(key)
        if capped and not state.retry_after_capped:
            state.retry_after_capped = True
            self.runtime.stats.inc_value("resilience/retry/retry_after_capped")
            logger.warning(
                "%(domain)s sent a Retry-After above RESILIENCE_RETRY_AFTER_MAX; waiting "
                "%(seconds)gs instead (logged once per domain)",
                {"domain": key, "seconds": seconds},
                extra={"spider": self.crawler.spider},
            )
        return seconds

    def _pause(self, key: str, until: float, seconds: float) -> None:
        runtime = self.runtime
        if runtime.registry.pause(runtime.domain(key), until):
            runtime.stats.inc_value("resilience/pause/count")
            runtime.wake_at(until)
            logger.debug(
                "Pausing %(domain)s for %(seconds).1fs (Retry-After)",
                {"domain": key, "seconds": seconds},
                extra={"spider": self.crawler.spider},
            )


def _load_exception_classes(paths: list[object]) -> tuple[type[BaseException], ...]:
    """Load ``RETRY_EXCEPTIONS``; raise InvalidSettingError for an entry that is
    not an exception class or its import path."""
    classes = []
    for path in paths:
        try:
            loaded = load_object(path) if isinstance(path, str) else path
        except (ImportError, NameError, ValueError, AttributeError) as error:
            raise InvalidSettingError(
                "RETRY_EXCEPTIONS", path, f"Each entry must be an exception class: {error}."
            ) from error
        if not (isinstance(loaded, type) and issubclass(loaded, BaseException)):
            raise InvalidSettingError(
                "RETRY_EXCEPTIONS", path, "Each entry must be an exception class or its path."
            )
        classes.append(loaded)
    return tuple(classes)
