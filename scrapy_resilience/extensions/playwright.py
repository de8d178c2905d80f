"""Browser health for crawls that render pages with scrapy-playwright.

The monitor watches scrapy-playwright's download handler every
``RESILIENCE_PLAYWRIGHT_CHECK_INTERVAL`` seconds:

1. It counts browser faults: attempts that failed because the page crashed or
   its page, context or browser closed. The observer records no outcome for
   them, so they never count against the site's circuit, and the backoff retry
   retries them up to ``RESILIENCE_PLAYWRIGHT_RETRY_TIMES``.
2. It counts browser relaunches. scrapy-playwright relaunches a browser that
   disconnected (killed or crashed) inside its handler, so no middleware receives
   the failure, and the only trace is its ``playwright/browser_count`` stat
   rising above 1.
3. It compares the pages open in the browser with the requests in flight
   through the browser. Pages that a callback received with
   ``playwright_include_page=True`` and never closed stay open and take places
   of ``PLAYWRIGHT_MAX_PAGES_PER_CONTEXT`` until the crawl stalls. When open
   pages exceed the requests in flight by ``RESILIENCE_PLAYWRIGHT_LEAK_MIN_PAGES``
   or more on ``RESILIENCE_PLAYWRIGHT_LEAK_CHECKS`` checks in a row, it logs a
   WARNING with the numbers and counts the leak.
4. With ``RESILIENCE_PLAYWRIGHT_RECYCLE``, a leak also recycles the browser,
   and so does memory pressure: memory still above the memory guard's limit
   once the guard has lowered concurrency to its minimum, at most once per
   ``RESILIENCE_PLAYWRIGHT_RECYCLE_MIN_INTERVAL`` seconds. The monitor pauses
   the engine, waits until no request is in the downloader
   and no response is in the spider's callbacks, closes the browser, waits
   until scrapy-playwright dropped it, and unpauses the engine. The next
   browser request launches a new browser. Closing browser contexts while
   requests were in flight hung crawls, which is why the monitor waits first.
   A wait longer than ``RESILIENCE_PLAYWRIGHT_RECYCLE_TIMEOUT`` seconds ends the
   attempt without closing anything.

scrapy-playwright's ``playwright/page_count`` stat counts pages created, not
open, so the open pages are read from the handler objects, a private API of
Scrapy (``engine.downloader.handlers._handlers``) and of scrapy-playwright
(``context_wrappers``), checked with 0.0.48 on Scrapy 2.19. When either is
missing, the monitor logs one WARNING and stops checking pages; the other
counts keep working.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro
from twisted.internet.task import LoopingCall

from scrapy_resilience.core.classify import is_browser_fault
from scrapy_resilience.extensions.memory import MemoryGuard
from scrapy_resilience.runtime import Attempt, Runtime
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: Module of scrapy-playwright's download handler class.
HANDLER_MODULE_PREFIX = "scrapy_playwright"

#: Seconds between two looks at the engine while a recycle waits.
RECYCLE_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class LeakVerdict:
    """The outcome of one page check.

    ``excess`` is open pages minus requests in flight (at least 0). ``started``
    is True on the check that begins a leak episode, the only check that warns.
    """

    excess: int
    leaking: bool
    started: bool


class PageLeakDetector:
    """Decide from successive counts whether browser pages are leaking.

    A check is suspect when open pages exceed requests in flight by at least
    ``min_pages``. A leak starts on the ``checks``-th suspect check in a row
    and lasts until a check is no longer suspect.
    """

    def __init__(self, min_pages: int, checks: int) -> None:
        if min_pages < 1 or checks < 1:
            raise ValueError(f"min_pages and checks must be at least 1: {min_pages}, {checks}")
        self.min_pages = min_pages
        self.checks = checks
        self.suspect_checks = 0
        self.leaking = False

    def observe(self, open_pages: int, in_flight: int) -> LeakVerdict:
        """Record one check of ``open_pages`` against ``in_flight`` requests."""
        excess = max(0, open_pages - in_flight)
        if excess < self.min_pages:
            self.suspect_checks = 0
            self.leaking = False
            return LeakVerdict(excess, leaking=False, started=False)

        self.suspect_checks += 1
        started = not self.leaking and self.suspect_checks >= self.checks
        self.leaking = self.leaking or started
        return LeakVerdict(excess, leaking=self.leaking, started=started)


def playwright_handlers(downloader: Any) -> list[Any] | None:
    """Return the scrapy-playwright handlers loaded in ``downloader``, each once.

    Return None when Scrapy's private ``handlers._handlers`` is missing.
    """
    handlers = getattr(getattr(downloader, "handlers", None), "_handlers", None)
    if not isinstance(handlers, dict):
        return None

    found: dict[int, Any] = {}
    for handler in handlers.values():
        if type(handler).__module__.startswith(HANDLER_MODULE_PREFIX):
            found[id(handler)] = handler
    return list(found.values())


def count_open_pages(downloader: Any) -> int | None:
    """Return the pages open in every scrapy-playwright handler of ``downloader``.

    Return 0 when no scrapy-playwright handler is loaded (yet), and None when
    the private attributes read here are missing, so the count is unknown.
    """
    handlers = playwright_handlers(downloader)
    if handlers is None:
        return None

    total = 0
    for handler in handlers:
        wrappers = getattr(handler, "context_wrappers", None)
        if not isinstance(wrappers, dict):
            return None
        try:
            total += sum(len(wrapper.context.pages) for wrapper in wrappers.values())
        except AttributeError:
            return None
    return total


class PlaywrightMonitor:
    """Count browser faults and relaunches, and detect leaked browser pages.

    ``open_pages`` replaces :func:`count_open_pages` in tests; it receives the
    engine's downloader.
    """

    def __init__(self, crawler: Crawler, *, open_pages: Any = count_open_pages) -> None:
        if not get_bool(crawler.settings, "RESILIENCE_PLAYWRIGHT_ENABLED"):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        self.config = self.runtime.config.playwright
        self.detector = PageLeakDetector(self.config.leak_min_pages, self.config.leak_checks)
        self._open_pages = open_pages

        #: Requests with ``playwright`` in meta between reaching and leaving the downloader.
        self.in_flight = 0
        self.browser_launches = 0
        #: Browsers closed by a recycle; their replacements are no relaunches.
        self.recycles = 0
        self._pages_unknown = False
        self._task: LoopingCall | None = None
        self._recycle_task: LoopingCall | None = None
        self._recycle_deadline = 0.0
        self._recycle_reason = ""
        self._last_recycle_at: float | None = None
        self._closed = False
        self._warned_no_restart = False

        self.runtime.attempt_listeners.append(self._attempt_finished)
        crawler.signals.connect(self._reached, signal=signals.request_reached_downloader)
        crawler.signals.connect(self._left, signal=signals.request_left_downloader)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # Signal handlers

    def spider_opened(self, spider: Spider) -> None:
        self.runtime.stats.set_value("resilience/playwright/browser_relaunches", 0)
        self._task = LoopingCall(self.check)
        self._task.start(self.config.check_interval, now=False)

    def spider_closed(self, spider: Spider, reason: str) -> None:
        self._closed = True
        for task in (self._task, self._recycle_task):
            if task is not None and task.running:
                task.stop()
        self._check_relaunches()

    def _reached(self, request: Request, spider: Spider) -> None:
        if request.meta.get("playwright"):
            self.in_flight += 1

    def _left(self, request: Request, spider: Spider) -> None:
        if request.meta.get("playwright"):
            self.in_flight = max(0, self.in_flight - 1)

    def _attempt_finished(self, attempt: Attempt) -> None:
        # The report is written at spider_closed, possibly before this
        # monitor's own handler runs, so relaunches are also counted here.
        self._check_relaunches()
        if attempt.exception is not None and is_browser_fault(attempt.exception):
            self.runtime.stats.inc_value("resilience/playwright/browser_faults")

    # Checks

    def check(self) -> None:
        """Count browser relaunches, then compare open pages with requests in flight."""
        self._check_relaunches()
        engine = self.crawler.engine
        if engine is None or self._pages_unknown:
            return

        open_pages = self._open_pages(engine.downloader)
        if open_pages is None:
            self._stop_page_checks()
            return
        self._check_pages(open_pages)
        if self.config.recycle:
            self._check_memory(engine)

    def _check_relaunches(self) -> None:
        launches = int(self.runtime.stats.get_value("playwright/browser_count", 0) or 0)
        if launches <= self.browser_launches:
            return

        previous = max(0, self.browser_launches - 1 - self.recycles)
        relaunches = max(0, launches - 1 - self.recycles)
        if relaunches > previous:
            logger.warning(
                "scrapy-playwright relaunched the browser after it disconnected "
                "(%(relaunches)d relaunches so far); pages open in the old browser were lost "
                "and their requests failed or were retried by scrapy-playwright",
                {"relaunches": relaunches},
                extra={"spider": self.crawler.spider},
            )
        self.browser_launches = launches
        self.runtime.stats.set_value("resilience/playwright/browser_relaunches", relaunches)

    def _check_pages(self, open_pages: int) -> None:
        stats = self.runtime.stats
        stats.max_value("resilience/playwright/max_open_pages", open_pages)
        verdict = self.detector.observe(open_pages, self.in_flight)
        if verdict.leaking:
            stats.max_value("resilience/playwright/max_leaked_pages", verdict.excess)
        if not verdict.started:
            return

        stats.inc_value("resilience/playwright/page_leaks")
        logger.warning(
            "Browser pages are leaking: %(open)d pages open but %(in_flight)d requests in "
            "flight through the browser, on %(checks)d checks in a row. Close every page "
            "received with playwright_include_page=True (await page.close()), in errbacks too",
            {"open": open_pages, "in_flight": self.in_flight, "checks": self.detector.checks},
            extra={"spider": self.crawler.spider},
        )
        if self.config.recycle:
            self.recycle(f"{verdict.excess} leaked pages")

    def _check_memory(self, engine: Any) -> None:
        """Recycle the browser when the memory guard, at its minimum concurrency,
        still measures memory above its limit."""
        guard = self.crawler.get_extension(MemoryGuard)
        sample = guard.last_sample if guard is not None else None
        if guard is None or sample is None or sample.memory_mb <= guard.limit_mb:
            return
        if engine.downloader.total_concurrency > guard.policy.config.min_concurrency:
            return
        last = self._last_recycle_at
        if last is not None and self.runtime.clock() - last < self.config.recycle_min_interval:
            return

        self.recycle(
            f"memory {sample.memory_mb:.0f} MB above the limit of {guard.limit_mb:.0f} MB "
            f"at the minimum concurrency"
        )

    # Recycling

    def recycle(self, reason: str) -> bool:
        """Start recycling the browser; return False when one is under way or
        there is no engine."""
        engine = self.crawler.engine
        if engine is None or self._recycle_task is not None or self._closed:
            return False
        if not self.crawler.settings.getbool("PLAYWRIGHT_RESTART_DISCONNECTED_BROWSER", True):
            # scrapy-playwright would not launch a new browser after the close.
            if not self._warned_no_restart:
                self._warned_no_restart = True
                logger.warning(
                    "Not recycling the browser (%(reason)s): "
                    "PLAYWRIGHT_RESTART_DISCONNECTED_BROWSER is False",
                    {"reason": reason},
                    extra={"spider": self.crawler.spider},
                )
            return False

        logger.info(
            "Recycling the browser (%(reason)s): pausing the engine until no request is in flight",
            {"reason": reason},
            extra={"spider": self.crawler.spider},
        )
        engine.pause()
        self._last_recycle_at = self.runtime.clock()
        self._recycle_reason = reason
        self._recycle_deadline = self.runtime.clock() + self.config.recycle_timeout
        self._recycle_task = LoopingCall(self._recycle_when_idle)
        self._recycle_task.start(RECYCLE_POLL_SECONDS, now=True)
        return True

    def _recycle_when_idle(self) -> None:
        engine = self.crawler.engine
        assert engine is not None
        if not _engine_idle(engine):
            if self.runtime.clock() > self._recycle_deadline:
                self._end_recycle(closed=False)
            return

        assert self._recycle_task is not None
        self._recycle_task.stop()
        handlers = playwright_handlers(engine.downloader) or []
        deferred = deferred_from_coro(_close_browsers(handlers, self.config.recycle_timeout))
        deferred.addCallback(lambda closed: self._end_recycle(closed=closed))
        deferred.addErrback(self._recycle_failed)

    def _end_recycle(self, *, closed: bool) -> None:
        task, self._recycle_task = self._recycle_task, None
        if task is not None and task.running:
            task.stop()
        engine = self.crawler.engine
        if engine is not None:
            engine.unpause()

        if closed:
            self.recycles += 1
            self.runtime.stats.set_value("resilience/playwright/recycles", self.recycles)
            logger.info(
                "Recycled the browser (%(reason)s); the next browser request launches a new one",
                {"reason": self._recycle_reason},
                extra={"spider": self.crawler.spider},
            )
            return
        self.runtime.stats.inc_value("resilience/playwright/recycle_timeouts")
        logger.warning(
            "Did not recycle the browser (%(reason)s): requests were still in flight, or "
            "the browser did not close, after %(timeout)gs",
            {"reason": self._recycle_reason, "timeout": self.config.recycle_timeout},
            extra={"spider": self.crawler.spider},
        )

    def _recycle_failed(self, failure: Any) -> None:
        logger.error(
            "Recycling the browser failed: %(error)s",
            {"error": failure.getErrorMessage()},
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
            extra={"spider": self.crawler.spider},
        )
        self._end_recycle(closed=False)

    def _stop_page_checks(self) -> None:
        self._pages_unknown = True
        self.runtime.stats.set_value("resilience/playwright/open_pages_unknown", 1)
        logger.warning(
            "Cannot count open browser pages: this Scrapy or scrapy-playwright version lacks "
            "engine.downloader.handlers._handlers or the handler's context_wrappers; page "
            "leaks will not be detected",
            extra={"spider": self.crawler.spider},
        )


def _engine_idle(engine: Any) -> bool:
    """Return whether no request is in the downloader and no response in callbacks."""
    if engine.downloader.active:
        return False
    scraper_slot = getattr(engine.scraper, "slot", None)
    return scraper_slot is None or scraper_slot.is_idle()


async def _close_browsers(handlers: list[Any], timeout: float) -> bool:
    """Close the browser of each handler; return whether all were closed and
    dropped by their handlers within ``timeout`` seconds.

    scrapy-playwright drops a disconnected browser in an event callback that
    runs after ``close()`` returns, and a request sent before that would get
    the closed browser, so this waits for the drop too.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for handler in handlers:
        browser = getattr(handler, "browser", None)
        if browser is None:
            continue
        await asyncio.wait_for(browser.close(), timeout)
        while getattr(handler, "browser", None) is browser:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(RECYCLE_POLL_SECONDS)
    return True
