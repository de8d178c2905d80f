"""Jittered exponential-backoff retry, a compatible replacement for Scrapy's
``RetryMiddleware``.

Rules:

1. A failure is classified as ``network``, ``timeout``, ``server`` (a status in
   ``RETRY_HTTP_CODES``), ``throttled`` (429, or 503 with ``Retry-After``) or
   ``content`` (rejected by ``RESILIENCE_RETRY_CONTENT_CHECK``). Anything else,
   :exc:`~scrapy.exceptions.IgnoreRequest` included, is passed on untouched.
2. Each category has its own limit (``RESILIENCE_RETRY_TIMES_BY_CATEGORY``).
   ``max_retry_times`` in meta, or ``RETRY_TIMES`` when the project sets it,
   also caps the retries of all categories but ``throttled`` together;
   ``retry_times`` in meta counts those retries, as in Scrapy.
3. While a domain has never succeeded, or its circuit is not closed, failures
   that the circuit counts do not use up retries: the request waits in the
   hold for the circuit's verdict (a successful probe, or giving up).
4. A retry of a scheduler-originated request waits in the hold, off the
   downloader: ``Retry-After`` (capped by ``RESILIENCE_RETRY_AFTER_MAX``) for
   throttled answers, else the backoff delay.
5. A request out of retries reaches its errback with its own final failure
   (the exception, ``HttpError`` for a status, or
   :exc:`~scrapy_resilience.ContentRejectedError`), with
   ``resilience_category`` set in its meta.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from logging import Logger, getLevelName
from typing import TYPE_CHECKING, Any, cast

from scrapy.downloadermiddlewares.retry import get_retry_request as scrapy_get_retry_request
from scrapy.exceptions import NotConfigured
from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.python import global_object_name
from scrapy.utils.response import response_status_message

from scrapy_resilience.core.circuit import CircuitState
from scrapy_resilience.core.classify import (
    Category,
    classify_exception,
    classify_status,
    is_browser_fault,
)
from scrapy_resilience.core.headers import cap_retry_after, parse_retry_after
from scrapy_resilience.downloadermiddlewares.circuitbreaker import (
    DONT_CIRCUIT,
    _load_exception_classes,
)
from scrapy_resilience.exceptions import (
    CircuitOpenError,
    ContentRejectedError,
    InvalidSettingError,
)
from scrapy_resilience.runtime import Runtime
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: Meta key of the per-category retry counts; removed before the final
#: response or failure reaches the spider.
COUNTS_KEY = "_resilience_retries"

#: Meta key set on a request's final failure: the category of its last failure.
CATEGORY_KEY = "resilience_category"

CIRCUIT_CATEGORIES = frozenset({Category.NETWORK, Category.TIMEOUT, Category.SERVER})

#: Retry key of browser faults (a crashed page, a closed page, context or
#: browser) in the per-request counts, stats and ``resilience_category``. It is
#: no :class:`Category`, because such a failure says nothing about the site.
BROWSER_FAULT = "browser"


class BackoffRetryMiddleware:
    """Retry failed downloads after a jittered backoff, per failure category."""

    def __init__(self, crawler: Crawler) -> None:
        settings = crawler.settings
        if not settings.getbool("RETRY_ENABLED") or not get_bool(
            settings, "RESILIENCE_RETRY_ENABLED"
        ):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        self.config = self.runtime.config.retry
        self.retry_http_codes = frozenset(
            int(code) for code in settings.getlist("RETRY_HTTP_CODES")
        )
        self.extra_network = _load_exception_classes(settings.getlist("RETRY_EXCEPTIONS"))
        self.priority_adjust = settings.getint("RETRY_PRIORITY_ADJUST")
        self.give_up_log_level = _log_level(settings.get("RETRY_GIVE_UP_LOG_LEVEL", "ERROR"))
        explicit = (settings.getpriority("RETRY_TIMES") or 0) > SETTINGS_PRIORITIES["default"]
        self.max_retry_times: int | None = settings.getint("RETRY_TIMES") if explicit else None
        self._content_check: Any = None
        self.browser_retry_times = self.runtime.config.playwright.retry_times

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        if request.meta.get("dont_retry", False):
            request.meta.pop(COUNTS_KEY, None)
            return response

        retry_after = None
        if response.status in (429, 503):
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        category = classify_status(response.status, retry_after is not None, self.retry_http_codes)
        if category is None and not self._content_accepted(request, response):
            category = Category.CONTENT
        if category is None:
            request.meta.pop(COUNTS_KEY, None)
            return response

        if category is Category.THROTTLED and response.status not in self.retry_http_codes:
            # The project removed this status from RETRY_HTTP_CODES.
            request.meta.pop(COUNTS_KEY, None)
            return response

        if retry_after is not None:
            retry_after = cap_retry_after(retry_after, self.config.retry_after_max)[0]
        reason = (
            "content rejected"
            if category is Category.CONTENT
            else response_status_message(response.status)
        )
        retry = self.retry(request, category, reason, retry_after=retry_after)
        if retry is not None:
            return retry
        if category is Category.CONTENT:
            raise ContentRejectedError(response)
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Request | None:
        if request.meta.get("dont_retry", False):
            request.meta.pop(COUNTS_KEY, None)
            return None
        category = classify_exception(exception, self.extra_network)
        if category is None and is_browser_fault(exception):
            return self.retry_browser_fault(request, exception)
        if category is None:
            request.meta.pop(COUNTS_KEY, None)
            return None
        return self.retry(request, category, exception)

    def retry_browser_fault(self, request: Request, exception: Exception) -> Request | None:
        """Return a retry of a request whose browser page crashed or closed, or
        None once it had ``RESILIENCE_PLAYWRIGHT_RETRY_TIMES`` such retries.

        The retry waits out the backoff in the hold, as other retries do, and
        counts toward ``max_retry_times``. The circuit never waits on these
        failures: the observer records no outcome for them.
        """
        runtime = self.runtime
        track = runtime.tracks.get(request)
        scheduled = track.scheduled if track is not None else runtime.take_bookkeeping(request)
        counts: dict[str, Any] = dict(request.meta.get(COUNTS_KEY) or {})
        reason_name = global_object_name(exception.__class__)

        used = counts.get(BROWSER_FAULT, 0) + 1
        counts[BROWSER_FAULT] = used
        retry_times = request.meta.get("retry_times", 0) + 1
        if used > self.browser_retry_times or not self._within_cap(request, retry_times):
            self._give_up(request, BROWSER_FAULT, reason_name, retry_times)
            return None
        retry = self._build_retry(
            request,
            counts,
            retry_times=retry_times,
            category=BROWSER_FAULT,
            reason_name=reason_name,
            scheduled=scheduled,
        )
        # With playwright_include_page, scrapy-playwright keeps the failed page
        # in meta and would reuse it: a crashed page is not closed, and fails again.
        page = retry.meta.pop("playwright_page", None)
        if page is not None:
            _close_page_later(page)
        return retry

    def retry(
        self,
        request: Request,
        category: Category,
        reason: str | Exception,
        *,
        retry_after: float | None = None,
    ) -> Request | None:
        """Return a retry of ``request`` that waits in the hold, or None when
        its retries are used up (then its meta gets ``resilience_category``)."""
        runtime = self.runtime
        track = runtime.tracks.get(request)
        scheduled = track.scheduled if track is not None else runtime.take_bookkeeping(request)
        key = track.key if track is not None else runtime.domain_key(request)
        state = runtime.domain(key)
        if runtime.circuit_active and state.circuit.given_up and not request.meta.get(DONT_CIRCUIT):
            # A retry could only fail in admission: fail now, with the same error.
            request.meta.pop(COUNTS_KEY, None)
            state.rejected += 1
            runtime.stats.inc_value("resilience/circuit/rejected")
            raise CircuitOpenError(key, state.circuit.give_up_reason or "given up")
        counts: dict[str, Any] = dict(request.meta.get(COUNTS_KEY) or {})
        reason_name = (
            global_object_name(reason.__class__) if isinstance(reason, Exception) else reason
        )

        circuit_wait = (
            scheduled and runtime.circuit_active and self._circuit_decides(state, category)
        )
        retry_times = request.meta.get("retry_times", 0)
        if not circuit_wait:
            used = counts.get(category.value, 0) + 1
            counts[category.value] = used
            if category is not Category.THROTTLED:
                retry_times += 1
            if not self._within_limits(request, category, used, retry_times):
                self._give_up(request, category, reason_name, retry_times)
                return None

        if circuit_wait:
            runtime.stats.inc_value("resilience/retry/circuit_wait")
        if category is not Category.THROTTLED:
            retry_after = None
        return self._build_retry(
            request,
            counts,
            retry_times=retry_times,
            category=category.value,
            reason_name=reason_name,
            scheduled=scheduled,
            retry_after=retry_after,
        )

    def _build_retry(
        self,
        request: Request,
        counts: dict[str, Any],
        *,
        retry_times: int,
        category: str,
        reason_name: str,
        scheduled: bool,
        retry_after: float | None = None,
    ) -> Request:
        """Return the retry of ``request``, held for ``retry_after`` seconds, or
        else the backoff delay, when ``scheduled``. ``counts`` and
        ``retry_times`` already count this retry."""
        runtime = self.runtime
        attempts = counts.get("attempts", 1)
        counts["attempts"] = attempts + 1
        if retry_after is not None:
            delay = retry_after
        else:
            delay = self.config.backoff.delay(attempts, runtime.rng, counts.get("delay"))
        counts["delay"] = delay

        new_request = request.copy()
        new_request.meta[COUNTS_KEY] = counts
        new_request.meta["retry_times"] = retry_times
        new_request.meta.pop(CATEGORY_KEY, None)
        # A held retry skips the dupefilter anyway (the hold takes it before
        # the scheduler and releases it with dont_filter=True), so it keeps its
        # own flag, and a redirect it gets stays subject to the dupefilter.
        new_request.dont_filter = request.dont_filter if scheduled else True
        priority_adjust = request.meta.get("priority_adjust", self.priority_adjust)
        new_request.priority = request.priority + priority_adjust

        stats = runtime.stats
        stats.inc_value("retry/count")
        stats.inc_value(f"retry/reason_count/{reason_name}")
        stats.inc_value(f"resilience/retry/category/{category}")
        if scheduled:
            runtime.hold_later(new_request, runtime.clock() + delay, "retry")
            stats.inc_value("resilience/retry/delayed")
        logger.debug(
            "Retrying %(request)s in %(delay).2fs (%(category)s, failed %(attempts)d times): "
            "%(reason)s",
            {
                "request": request,
                "delay": delay if scheduled else 0.0,
                "category": category,
                "attempts": attempts,
                "reason": reason_name,
            },
            extra={"spider": self.crawler.spider},
        )
        return new_request

    def _circuit_decides(self, state: Any, category: Category) -> bool:
        circuit = state.circuit
        undecided = not circuit.proven or circuit.state is not CircuitState.CLOSED
        counted = category in (Category.NETWORK, Category.TIMEOUT) or (
            category is Category.SERVER and undecided
        )
        return undecided and counted and not circuit.given_up

    def _within_limits(
        self, request: Request, category: Category, used: int, retry_times: int
    ) -> bool:
        if used > self.config.times_by_category[category]:
            return False
        if category is Category.THROTTLED:
            return True
        return self._within_cap(request, retry_times)

    def _within_cap(self, request: Request, retry_times: int) -> bool:
        """Return whether ``retry_times`` is within ``max_retry_times`` (meta)
        or ``RETRY_TIMES`` when the project sets it."""
        cap = request.meta.get("max_retry_times")
        if cap is None:
            cap = self.max_retry_times
        return cap is None or retry_times <= cap

    def _give_up(
        self, request: Request, category: Category | str, reason: str, retry_times: int
    ) -> None:
        name = category.value if isinstance(category, Category) else category
        request.meta.pop(COUNTS_KEY, None)
        request.meta[CATEGORY_KEY] = name
        stats = self.runtime.stats
        stats.inc_value("retry/max_reached")
        stats.inc_value(f"resilience/retry/gave_up/{name}")
        level = _log_level(request.meta.get("give_up_log_level", self.give_up_log_level))
        logger.log(
            level,
            "Gave up retrying %(request)s (failed %(retry_times)d times, %(category)s): %(reason)s",
            {
                "request": request,
                "retry_times": retry_times,
                "category": name,
                "reason": reason,
            },
            extra={"spider": self.crawler.spider},
        )

    def _content_accepted(self, request: Request, response: Response) -> bool:
        """Run the content check on a response to a spider's request.

        Direct downloads (robots.txt, media files) are not the spider's pages,
        so the check never sees them.
        """
        if self.config.content_check is None:
            return True
        track = self.runtime.tracks.get(request)
        if track is not None and not track.scheduled:
            return True
        if self._content_check is None:
            self._content_check = self._resolve_content_check()
        return bool(self._content_check(response))

    def _resolve_content_check(self) -> Callable[[Response], Any]:
        check = self.config.content_check
        spider = self.crawler.spider
        if isinstance(check, str):
            method = getattr(spider, check, None)
            if not callable(method):
                raise AttributeError(
                    "RESILIENCE_RETRY_CONTENT_CHECK names the spider method "
                    f"{check!r}, but the spider has no such method."
                )
            return cast(Callable[[Response], Any], method)
        assert check is not None
        # Decide once from the signature, so a TypeError raised inside the
        # check is never mistaken for a wrong number of arguments.
        try:
            parameters = inspect.signature(check).parameters.values()
        except (TypeError, ValueError):
            return check
        positional = [
            p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in parameters)
        if takes_varargs or len(positional) >= 2:
            return lambda response: check(response, spider)
        return check


def _close_page_later(page: Any) -> None:
    """Close a Playwright page in the background; log at DEBUG when that fails."""

    def log_failure(failure: Any) -> None:
        logger.debug("Closing a failed browser page failed: %(error)s", {"error": failure.value})

    deferred_from_coro(page.close()).addErrback(log_failure)


def _log_level(level: int | str, name: str = "RETRY_GIVE_UP_LOG_LEVEL") -> int:
    """Return a logging level from a number or a level name; raise
    InvalidSettingError for anything else, as Scrapy does at start-up."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    resolved = getLevelName(str(level).upper())
    if not isinstance(resolved, int):
        raise InvalidSettingError(
            name, level, "It must be a logging level such as 'ERROR', 'WARNING' or 40."
        )
    return resolved


def get_retry_request(
    request: Request,
    *,
    spider: Spider,
    reason: str | Exception | type[Exception] = "unspecified",
    max_retry_times: int | None = None,
    priority_adjust: int | None = None,
    logger: Logger = logger,
    give_up_log_level: int | str | None = None,
    stats_base_key: str = "retry",
) -> Request | None:
    """Return a retry of ``request`` made in a spider callback, or None.

    Same signature and counting as :func:`scrapy.downloadermiddlewares.retry.get_retry_request`;
    the retry it returns waits out the bundle's backoff in the hold (when the
    bundle is enabled for the spider's crawler) instead of being downloaded at once.
    """
    options: dict[str, Any] = {
        "spider": spider,
        "reason": reason,
        "max_retry_times": max_retry_times,
        "priority_adjust": priority_adjust,
        "logger": logger,
        "stats_base_key": stats_base_key,
    }
    if give_up_log_level is not None:
        options["give_up_log_level"] = give_up_log_level
    new_request = scrapy_get_retry_request(request, **options)
    runtime = Runtime.find(spider.crawler)
    if new_request is None or runtime is None:
        return new_request

    delay = runtime.config.retry.backoff.delay(new_request.meta["retry_times"], runtime.rng)
    new_request.dont_filter = request.dont_filter
    runtime.hold_later(new_request, runtime.clock() + delay, "retry")
    runtime.stats.inc_value("resilience/retry/delayed")
    return new_request
