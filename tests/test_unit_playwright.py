"""scrapy-playwright support without a browser: the page leak rule, the open page
count read from handler objects, the monitor's stats and logs, and the backoff
retry of browser faults, on a real runtime with fake handlers."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from scrapy import Request
from scrapy.utils.test import get_crawler

from scrapy_resilience import runtime as runtime_module
from scrapy_resilience.downloadermiddlewares.retry import (
    BROWSER_FAULT,
    CATEGORY_KEY,
    COUNTS_KEY,
    BackoffRetryMiddleware,
)
from scrapy_resilience.extensions import playwright as playwright_module
from scrapy_resilience.extensions.memory import MemoryGuard
from scrapy_resilience.extensions.playwright import (
    PageLeakDetector,
    PlaywrightMonitor,
    _close_browsers,
    _engine_idle,
    count_open_pages,
)
from scrapy_resilience.runtime import Attempt, Runtime, Track

playwright_errors = pytest.importorskip("playwright._impl._errors")

# A handler class whose module looks like scrapy-playwright's.
FakePlaywrightHandler = type(
    "ScrapyPlaywrightDownloadHandler", (), {"__module__": "scrapy_playwright.handler"}
)
FakeHttpHandler = type("HTTP11DownloadHandler", (), {"__module__": "scrapy.core.downloader"})


def playwright_handler(*pages_per_context: int) -> Any:
    handler = FakePlaywrightHandler()
    handler.context_wrappers = {
        f"context{index}": SimpleNamespace(context=SimpleNamespace(pages=[object()] * count))
        for index, count in enumerate(pages_per_context)
    }
    return handler


def downloader_with(handlers: dict[str, Any]) -> Any:
    return SimpleNamespace(handlers=SimpleNamespace(_handlers=handlers))


# PageLeakDetector


def test_leak_starts_after_checks_in_row() -> None:
    detector = PageLeakDetector(min_pages=3, checks=2)
    first = detector.observe(open_pages=5, in_flight=1)
    second = detector.observe(open_pages=5, in_flight=1)
    third = detector.observe(open_pages=6, in_flight=1)
    assert (first.leaking, first.started, first.excess) == (False, False, 4)
    assert (second.leaking, second.started) == (True, True)
    assert (third.leaking, third.started, third.excess) == (True, False, 5)


def test_leak_episode_ends_below_margin() -> None:
    detector = PageLeakDetector(min_pages=2, checks=1)
    assert detector.observe(4, 0).started
    ended = detector.observe(3, 2)
    assert (ended.leaking, ended.excess) == (False, 1)
    assert detector.observe(4, 0).started


def test_interrupted_suspicion_restarts_count() -> None:
    detector = PageLeakDetector(min_pages=2, checks=2)
    detector.observe(4, 0)
    detector.observe(1, 0)
    assert not detector.observe(4, 0).leaking
    assert detector.observe(4, 0).started


def test_pages_below_in_flight_not_excess() -> None:
    detector = PageLeakDetector(min_pages=1, checks=1)
    verdict = detector.observe(open_pages=2, in_flight=5)
    assert verdict.excess == 0
    assert not verdict.leaking


@pytest.mark.parametrize(("min_pages", "checks"), [(0, 1), (1, 0)])
def test_detector_rejects_zero(min_pages: int, checks: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PageLeakDetector(min_pages, checks)


# count_open_pages


def test_open_pages_summed_over_contexts() -> None:
    handler = playwright_handler(2, 3)
    downloader = downloader_with({"http": handler, "https": handler})
    assert count_open_pages(downloader) == 5


def test_open_pages_of_separate_handlers_added() -> None:
    downloader = downloader_with({"http": playwright_handler(1), "https": playwright_handler(2)})
    assert count_open_pages(downloader) == 3


def test_open_pages_zero_without_playwright_handler() -> None:
    assert count_open_pages(downloader_with({"http": FakeHttpHandler()})) == 0
    assert count_open_pages(downloader_with({})) == 0


def test_open_pages_unknown_without_handlers_attribute() -> None:
    assert count_open_pages(SimpleNamespace(handlers=SimpleNamespace())) is None
    assert count_open_pages(SimpleNamespace()) is None


def test_open_pages_unknown_without_context_wrappers() -> None:
    assert count_open_pages(downloader_with({"http": FakePlaywrightHandler()})) is None


# PlaywrightMonitor


class FakeEngine:
    def __init__(self) -> None:
        self.downloader = SimpleNamespace(active=set())
        self.scraper = SimpleNamespace(slot=SimpleNamespace(is_idle=lambda: True))
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def unpause(self) -> None:
        self.paused = False


class FakeLoopingCall:
    """Records the function instead of scheduling it on the reactor."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.running = False

    def start(self, interval: float, now: bool = True) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class Setup:
    """A monitor on a real runtime; ``pages`` is what the fake handler reports."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.crawler = get_crawler(settings_dict=settings or {})
        self.now = 100.0
        self.runtime = Runtime(self.crawler, clock=lambda: self.now)
        setattr(self.crawler, runtime_module._ATTRIBUTE, self.runtime)
        self.engine = FakeEngine()
        self.crawler.engine = self.engine  # type: ignore[assignment]
        self.pages: int | None = 0
        self.monitor = PlaywrightMonitor(self.crawler, open_pages=lambda downloader: self.pages)
        self.spider = self.crawler._create_spider()
        self.crawler.spider = self.spider
        self.stats = self.runtime.stats

    def send(self, url: str, *, browser: bool = True) -> Request:
        request = Request(url, meta={"playwright": True} if browser else {})
        self.monitor._reached(request, self.spider)
        return request


def test_monitor_disabled_by_setting() -> None:
    from scrapy.exceptions import NotConfigured

    crawler = get_crawler(settings_dict={"RESILIENCE_PLAYWRIGHT_ENABLED": False})
    with pytest.raises(NotConfigured):
        PlaywrightMonitor(crawler)


def test_in_flight_counts_only_browser_requests() -> None:
    setup = Setup()
    browser = setup.send("http://a.test/1")
    setup.send("http://a.test/2", browser=False)
    assert setup.monitor.in_flight == 1
    setup.monitor._left(browser, setup.spider)
    assert setup.monitor.in_flight == 0


def test_leak_warned_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup(
        {"RESILIENCE_PLAYWRIGHT_LEAK_CHECKS": 2, "RESILIENCE_PLAYWRIGHT_LEAK_MIN_PAGES": 3}
    )
    setup.send("http://a.test/1")
    setup.pages = 5
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            setup.monitor.check()

    warnings = [r for r in caplog.records if "leaking" in r.getMessage()]
    assert len(warnings) == 1
    assert "5 pages open but 1 requests in flight" in warnings[0].getMessage()
    assert setup.stats.get_value("resilience/playwright/page_leaks") == 1
    assert setup.stats.get_value("resilience/playwright/max_open_pages") == 5
    assert setup.stats.get_value("resilience/playwright/max_leaked_pages") == 4


def test_no_leak_while_pages_match_requests() -> None:
    setup = Setup({"RESILIENCE_PLAYWRIGHT_LEAK_CHECKS": 1})
    for number in range(3):
        setup.send(f"http://a.test/{number}")
    setup.pages = 3
    setup.monitor.check()
    assert setup.stats.get_value("resilience/playwright/page_leaks") is None
    assert setup.stats.get_value("resilience/playwright/max_open_pages") == 3


def test_unknown_pages_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup()
    setup.pages = None
    with caplog.at_level(logging.WARNING):
        setup.monitor.check()
        setup.monitor.check()
    warnings = [r for r in caplog.records if "Cannot count open browser pages" in r.getMessage()]
    assert len(warnings) == 1
    assert setup.stats.get_value("resilience/playwright/open_pages_unknown") == 1


def test_relaunches_counted_from_browser_count(caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup()
    setup.stats.set_value("playwright/browser_count", 1)
    setup.monitor.check()
    assert setup.stats.get_value("resilience/playwright/browser_relaunches") == 0

    setup.stats.set_value("playwright/browser_count", 3)
    with caplog.at_level(logging.WARNING):
        setup.monitor.check()
        setup.monitor.check()
    assert setup.stats.get_value("resilience/playwright/browser_relaunches") == 2
    relaunch_logs = [r for r in caplog.records if "relaunched the browser" in r.getMessage()]
    assert len(relaunch_logs) == 1


def test_browser_faults_counted_from_attempts() -> None:
    setup = Setup()
    request = Request("http://a.test/1")
    track = Track("a.test", scheduled=True)
    crash = playwright_errors.Error("Page.content: Target crashed")
    timeout = playwright_errors.TimeoutError("Timeout 500ms exceeded")
    setup.runtime.notify_attempt(Attempt(track, request, None, exception=crash))
    setup.runtime.notify_attempt(Attempt(track, request, None, exception=timeout))
    assert setup.stats.get_value("resilience/playwright/browser_faults") == 1


# BackoffRetryMiddleware and browser faults


def retry_middleware(settings: dict[str, Any] | None = None) -> BackoffRetryMiddleware:
    crawler = get_crawler(settings_dict=settings or {})
    crawler.spider = crawler._create_spider()
    return BackoffRetryMiddleware(crawler)


def test_browser_fault_retried_up_to_limit() -> None:
    middleware = retry_middleware({"RESILIENCE_PLAYWRIGHT_RETRY_TIMES": 2})
    crash = playwright_errors.Error("Page.content: Target crashed")
    request = Request("http://a.test/1", meta={"playwright": True})

    first = middleware.process_exception(request, crash)
    assert isinstance(first, Request)
    second = middleware.process_exception(first, crash)
    assert isinstance(second, Request)
    assert second.meta[COUNTS_KEY][BROWSER_FAULT] == 2
    assert second.meta["retry_times"] == 2
    assert middleware.process_exception(second, crash) is None

    assert second.meta[CATEGORY_KEY] == BROWSER_FAULT
    stats = middleware.runtime.stats
    assert stats.get_value("resilience/retry/category/browser") == 2
    assert stats.get_value("resilience/retry/gave_up/browser") == 1
    assert stats.get_value("retry/count") == 2


def test_browser_fault_not_retried_at_zero() -> None:
    middleware = retry_middleware({"RESILIENCE_PLAYWRIGHT_RETRY_TIMES": 0})
    closed = playwright_errors.TargetClosedError()
    request = Request("http://a.test/1")
    assert middleware.process_exception(request, closed) is None
    assert request.meta[CATEGORY_KEY] == BROWSER_FAULT


def test_browser_fault_within_max_retry_times() -> None:
    middleware = retry_middleware({"RESILIENCE_PLAYWRIGHT_RETRY_TIMES": 5})
    crash = playwright_errors.Error("Target crashed")
    request = Request("http://a.test/1", meta={"max_retry_times": 1})
    retry = middleware.process_exception(request, crash)
    assert isinstance(retry, Request)
    assert middleware.process_exception(retry, crash) is None


def test_browser_fault_never_reaches_circuit() -> None:
    middleware = retry_middleware()
    crash = playwright_errors.Error("Target crashed")
    middleware.process_exception(Request("http://a.test/1"), crash)
    state = middleware.runtime.domain("a.test")
    assert not state.circuit.proven
    assert middleware.runtime.stats.get_value("resilience/retry/circuit_wait") is None


# Recycling


def test_recycle_times_out_while_busy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(playwright_module, "LoopingCall", FakeLoopingCall)
    setup = Setup({"RESILIENCE_PLAYWRIGHT_RECYCLE_TIMEOUT": 10})
    setup.engine.downloader.active.add(object())

    assert setup.monitor.recycle("test")
    assert setup.engine.paused
    assert not setup.monitor.recycle("again")

    setup.now += 5
    setup.monitor._recycle_when_idle()
    assert setup.engine.paused
    setup.now += 6
    with caplog.at_level(logging.WARNING):
        setup.monitor._recycle_when_idle()
    assert not setup.engine.paused
    assert setup.stats.get_value("resilience/playwright/recycle_timeouts") == 1
    assert setup.stats.get_value("resilience/playwright/recycles") is None
    assert any("Did not recycle the browser" in r.getMessage() for r in caplog.records)


def test_recycle_skipped_without_restart(caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup({"PLAYWRIGHT_RESTART_DISCONNECTED_BROWSER": False})
    with caplog.at_level(logging.WARNING):
        assert not setup.monitor.recycle("test")
        assert not setup.monitor.recycle("test")
    assert not setup.engine.paused
    warnings = [r for r in caplog.records if "Not recycling the browser" in r.getMessage()]
    assert len(warnings) == 1


def test_recycle_counted_and_relaunch_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(playwright_module, "LoopingCall", FakeLoopingCall)
    setup = Setup()
    setup.stats.set_value("playwright/browser_count", 1)
    setup.monitor.check()
    setup.monitor.recycle("test")
    setup.monitor._end_recycle(closed=True)
    setup.stats.set_value("playwright/browser_count", 2)
    setup.monitor.check()

    assert not setup.engine.paused
    assert setup.stats.get_value("resilience/playwright/recycles") == 1
    assert setup.stats.get_value("resilience/playwright/browser_relaunches") == 0


def test_engine_idle_needs_empty_downloader_and_scraper() -> None:
    engine = FakeEngine()
    assert _engine_idle(engine)
    engine.downloader.active.add(object())
    assert not _engine_idle(engine)
    engine.downloader.active.clear()
    engine.scraper.slot.is_idle = lambda: False
    assert not _engine_idle(engine)


class FakeBrowser:
    def __init__(self, handler: Any, drop_after: float | None) -> None:
        self.handler = handler
        self.drop_after = drop_after
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        if self.drop_after is not None:
            # scrapy-playwright drops the browser in its "disconnected" callback.
            asyncio.get_running_loop().call_later(self.drop_after, delattr, self.handler, "browser")


def test_close_browsers_waits_for_drop() -> None:
    handler = FakePlaywrightHandler()
    browser = FakeBrowser(handler, drop_after=0.05)
    handler.browser = browser
    assert asyncio.run(_close_browsers([handler, FakePlaywrightHandler()], timeout=5))
    assert browser.closed
    assert not hasattr(handler, "browser")


def test_close_browsers_false_when_not_dropped() -> None:
    handler = FakePlaywrightHandler()
    handler.browser = FakeBrowser(handler, drop_after=None)
    assert not asyncio.run(_close_browsers([handler], timeout=0.3))


def memory_guard(memory_mb: float, limit_mb: float = 500, min_concurrency: int = 1) -> Any:
    guard = MemoryGuard.__new__(MemoryGuard)
    guard.last_sample = SimpleNamespace(memory_mb=memory_mb)  # type: ignore[assignment]
    guard.limit = SimpleNamespace(limit_mb=limit_mb)  # type: ignore[assignment]
    guard.policy = SimpleNamespace(  # type: ignore[assignment]
        config=SimpleNamespace(min_concurrency=min_concurrency)
    )
    return guard


@pytest.mark.parametrize(
    ("memory_mb", "concurrency", "recycled"),
    [(600, 1, True), (400, 1, False), (600, 2, False)],
)
def test_memory_recycle_only_at_minimum(
    monkeypatch: pytest.MonkeyPatch, memory_mb: float, concurrency: int, recycled: bool
) -> None:
    monkeypatch.setattr(playwright_module, "LoopingCall", FakeLoopingCall)
    setup = Setup({"RESILIENCE_PLAYWRIGHT_RECYCLE": True})
    guard = memory_guard(memory_mb)
    monkeypatch.setattr(setup.crawler, "get_extension", lambda cls: guard)
    setup.engine.downloader.total_concurrency = concurrency
    setup.monitor.check()
    assert setup.engine.paused is recycled


def test_memory_recycle_waits_min_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(playwright_module, "LoopingCall", FakeLoopingCall)
    setup = Setup(
        {"RESILIENCE_PLAYWRIGHT_RECYCLE": True, "RESILIENCE_PLAYWRIGHT_RECYCLE_MIN_INTERVAL": 30}
    )
    guard = memory_guard(600)
    monkeypatch.setattr(setup.crawler, "get_extension", lambda cls: guard)
    setup.engine.downloader.total_concurrency = 1
    setup.monitor.check()
    setup.monitor._end_recycle(closed=True)

    setup.now += 29
    setup.monitor.check()
    assert not setup.engine.paused
    setup.now += 2
    setup.monitor.check()
    assert setup.engine.paused


def test_browser_fault_retry_drops_failed_page() -> None:
    middleware = retry_middleware()
    closed: list[bool] = []

    class FailedPage:
        async def close(self) -> None:
            closed.append(True)

    request = Request(
        "http://a.test/1",
        meta={"playwright_include_page": True, "playwright_page": FailedPage()},
    )

    async def retry_on_loop() -> Request | None:
        # The page is closed on the asyncio loop, as in a crawl with scrapy-playwright.
        retry = middleware.process_exception(request, playwright_errors.Error("Target crashed"))
        await asyncio.sleep(0)
        return retry

    retry = asyncio.run(retry_on_loop())
    assert isinstance(retry, Request)
    assert "playwright_page" not in retry.meta
    assert retry.meta["playwright_include_page"] is True
    assert closed == [True]
