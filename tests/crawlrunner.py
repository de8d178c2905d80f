"""Run one real Scrapy crawl in a fresh process and write what happened as JSON.

Usage: ``python tests/crawlrunner.py SPEC.json``. Each crawl runs in its own
process because a Twisted reactor cannot be restarted; tests start it with
:func:`tests.conftest.run_crawl`.

The spec holds ``settings``, ``start`` (a list of URLs or request dicts),
``follow`` (follow links on the same host), ``retry_in_callback`` (a URL
substring whose first response is retried with
:func:`scrapy_resilience.get_retry_request`) and ``output``. The output holds
the spider's callbacks and errbacks, the attempts the client sent and the
answers it received (monotonic times, comparable with the fault site's log),
and the final stats.

Memory workloads, all optional: ``hold_megabytes`` makes each of the first
``hold_pages`` callbacks (default: all) hold an anonymous memory map of that
size for ``hold_seconds`` (default 1); ``child_megabytes`` starts a child
process at spider open that holds that much memory until the memory guard
first lowers concurrency, or until the crawl ends with ``child_keep``;
``sample_tree_memory`` (seconds)
samples the PSS of the crawl process and its descendants in a thread, into
``tree_memory`` and ``tree_memory_peak_mb``, and the names of those processes
into ``tree_process_names``.

Browser requests: a request dict may hold ``page_methods``, a list of
``[method name, argument...]`` lists that become scrapy-playwright's
``playwright_page_methods``; a name of ``PAGE_FUNCTIONS`` calls that function
with the page instead. Each errback record also holds the exception's
``message`` (its first 300 characters).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import scrapy
from example_project.spiders.docs import build_link_extractor, is_same_origin
from faultsite import BAN_MARKER
from scrapy import signals
from scrapy.crawler import CrawlerProcess

from scrapy_resilience import get_retry_request
from scrapy_resilience import signals as resilience_signals

MB = 1024 * 1024

#: Run by the child process of ``child_megabytes``: touch every page of an
#: anonymous map so it is resident, then hold it until standard input closes.
CHILD_CODE = """
import mmap, sys
size = int(sys.argv[1]) * 1024 * 1024
buffer = mmap.mmap(-1, size)
for offset in range(0, size, mmap.PAGESIZE):
    buffer[offset] = 1
sys.stdin.read()
"""


async def crash_renderer(page: Any) -> None:
    """Crash the renderer process of a Playwright page with the DevTools command
    ``Page.crash``, as an out-of-memory kill or a renderer bug would."""
    session = await page.context.new_cdp_session(page)
    crashed = asyncio.get_running_loop().create_future()
    page.once("crash", lambda _page: crashed.done() or crashed.set_result(None))
    # Chromium never answers Page.crash, so the command is sent without waiting
    # for its answer, and the page's crash event ends the wait.
    command = asyncio.ensure_future(session.send("Page.crash"))
    try:
        await asyncio.wait_for(crashed, 10)
    finally:
        command.cancel()


#: Functions that ``page_methods`` names call with the page.
PAGE_FUNCTIONS = {"crash_renderer": crash_renderer}


def not_banned(response: Any) -> bool:
    """Content check for tests: reject the fault site's block page."""
    return BAN_MARKER not in response.text


RESILIENCE_SIGNALS = (
    "circuit_opened",
    "circuit_half_opened",
    "circuit_closed",
    "domain_given_up",
    "memory_pressure_changed",
)


class ProbeSpider(scrapy.Spider):
    name = "probe"

    def __init__(self, spec: dict[str, Any], record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.record = record
        self.link_extractor = build_link_extractor()
        self.retried: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.held_pages = 0
        self.held_megabytes = 0
        self.child: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> ProbeSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider._sent, signal=signals.request_reached_downloader)
        crawler.signals.connect(spider._left, signal=signals.request_left_downloader)
        crawler.signals.connect(spider._received, signal=signals.response_downloaded)
        touch = spider.spec.get("touch_on_open")
        if touch:
            # Ends a recovering host's failure window once its circuit opened.
            crawler.signals.connect(
                lambda **kwargs: Path(touch).touch(),
                signal=resilience_signals.circuit_opened,
                weak=False,
            )
        for name in RESILIENCE_SIGNALS:
            crawler.signals.connect(
                spider._event_recorder(name), signal=getattr(resilience_signals, name), weak=False
            )
        if spider.spec.get("child_megabytes"):
            crawler.signals.connect(spider._start_child, signal=signals.spider_opened)
            crawler.signals.connect(spider._stop_child, signal=signals.spider_closed)
            crawler.signals.connect(
                spider._release_child, signal=resilience_signals.memory_pressure_changed
            )
        return spider

    async def start(self) -> Any:
        for entry in self.spec["start"]:
            options = {"url": entry} if isinstance(entry, str) else entry
            meta = dict(options.get("meta", {}))
            if options.get("page_methods"):
                from scrapy_playwright.page import PageMethod

                meta["playwright_page_methods"] = [
                    PageMethod(PAGE_FUNCTIONS.get(name, name), *arguments)
                    for name, *arguments in options["page_methods"]
                ]
            yield scrapy.Request(
                options["url"],
                meta=meta,
                priority=options.get("priority", 0),
                dont_filter=options.get("dont_filter", False),
                errback=self.errback,
            )

    def parse(self, response: Any) -> Any:
        self.record["callbacks"].append(
            {
                "url": response.url,
                "status": response.status,
                "time": time.monotonic(),
                "meta_keys": sorted(response.meta),
            }
        )
        self._hold_memory()
        marker = self.spec.get("retry_in_callback")
        if marker and marker in response.url and response.url not in self.retried:
            self.retried.add(response.url)
            retry = get_retry_request(response.request, spider=self, reason="callback retry")
            if retry is not None:
                self.record["callback_retries"].append(
                    {"url": response.url, "time": time.monotonic()}
                )
                yield retry
            return
        if not self.spec.get("follow"):
            return
        for link in self.link_extractor.extract_links(response):
            if is_same_origin(link.url, response.url):
                yield response.follow(link.url, errback=self.errback)

    def errback(self, failure: Any) -> None:
        request = failure.request
        self.record["errbacks"].append(
            {
                "url": request.url,
                "exception": type(failure.value).__name__,
                "message": str(failure.value)[:300],
                "category": request.meta.get("resilience_category"),
                "time": time.monotonic(),
            }
        )

    def _hold_memory(self) -> None:
        megabytes = self.spec.get("hold_megabytes")
        if not megabytes or self.held_pages >= self.spec.get("hold_pages", float("inf")):
            return
        self.held_pages += 1
        # An anonymous map goes back to the system when closed, unlike small
        # Python objects, so memory in use follows the pages being held.
        buffer = mmap.mmap(-1, int(megabytes * MB))
        for offset in range(0, len(buffer), mmap.PAGESIZE):
            buffer[offset] = 1
        self.held_megabytes += megabytes
        self.record["max_held_megabytes"] = max(
            self.record.get("max_held_megabytes", 0), self.held_megabytes
        )
        from twisted.internet import reactor

        reactor.callLater(self.spec.get("hold_seconds", 1.0), self._free_memory, buffer, megabytes)

    def _free_memory(self, buffer: mmap.mmap, megabytes: float) -> None:
        buffer.close()
        self.held_megabytes -= megabytes

    def _start_child(self, spider: Any) -> None:
        command = [sys.executable, "-c", CHILD_CODE, str(int(self.spec["child_megabytes"]))]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE)
        self.record["child_started"] = time.monotonic()

    def _release_child(self, old_concurrency: int, new_concurrency: int, **kwargs: Any) -> None:
        child = self.child
        if child is None or new_concurrency >= old_concurrency or child.stdin is None:
            return
        if self.spec.get("child_keep"):
            return
        if not child.stdin.closed:
            child.stdin.close()
            self.record["child_released"] = time.monotonic()

    def _stop_child(self, spider: Any) -> None:
        child = self.child
        if child is None:
            return
        if child.stdin is not None and not child.stdin.closed:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _sent(self, request: Any, spider: Any) -> None:
        self.record["sent"].append({"url": request.url, "time": time.monotonic()})
        host = urlsplit(request.url).hostname or ""
        self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.record["sent"][-1]["total_in_flight"] = sum(self.in_flight.values())
        peaks = self.record["max_in_flight"]
        peaks[host] = max(peaks.get(host, 0), self.in_flight[host])
        total = sum(self.in_flight.values())
        self.record["max_total_in_flight"] = max(self.record["max_total_in_flight"], total)
        group = sum(self.in_flight.get(member, 0) for member in self.spec.get("group", ()))
        self.record["max_group_in_flight"] = max(self.record["max_group_in_flight"], group)

    def _left(self, request: Any, spider: Any) -> None:
        host = urlsplit(request.url).hostname or ""
        self.in_flight[host] -= 1

    def _received(self, response: Any, request: Any, spider: Any) -> None:
        # response_downloaded fires as soon as the handler returns, before any
        # middleware sees the response: the moment the client received it.
        self.record["received"].append(
            {"url": response.url, "status": response.status, "time": time.monotonic()}
        )

    def _event_recorder(self, name: str) -> Any:
        def record_event(**kwargs: Any) -> None:
            kwargs.pop("signal", None)
            kwargs.pop("sender", None)
            event = {"signal": name, "time": time.monotonic()}
            event.update(
                {
                    key: value
                    for key, value in kwargs.items()
                    if isinstance(value, (str, int, float))
                }
            )
            self.record["events"].append(event)

        return record_event


class TreeMemorySampler(threading.Thread):
    """Sample the PSS of this process and its descendants every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.process_names: set[str] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        process = psutil.Process()
        while not self.stopped.wait(self.interval):
            total = 0
            for member in [process, *process.children(recursive=True)]:
                try:
                    total += member.memory_full_info().pss
                    self.process_names.add(member.name())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.samples.append((time.monotonic(), total / MB))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    record: dict[str, Any] = {
        "callbacks": [],
        "errbacks": [],
        "sent": [],
        "received": [],
        "callback_retries": [],
        "events": [],
        "max_in_flight": {},
        "max_total_in_flight": 0,
        "max_group_in_flight": 0,
    }
    settings = {"LOG_LEVEL": "DEBUG", "TELNETCONSOLE_ENABLED": False, **spec["settings"]}
    process = CrawlerProcess(settings, install_root_handler=True)
    crawler = process.create_crawler(ProbeSpider)

    sampler = None
    if spec.get("sample_tree_memory"):
        sampler = TreeMemorySampler(float(spec["sample_tree_memory"]))
        sampler.start()

    started = time.monotonic()
    process.crawl(crawler, spec=spec, record=record)
    process.start()
    record["started"] = started
    record["finished"] = time.monotonic()
    record["process_cpu_seconds"] = time.process_time()
    # Peak RSS of this process alone, children excluded (ru_maxrss is in KiB on Linux).
    record["self_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if sampler is not None:
        sampler.stopped.set()
        sampler.join()
        record["tree_memory"] = sampler.samples
        record["tree_memory_peak_mb"] = max((mb for _, mb in sampler.samples), default=0.0)
        record["tree_process_names"] = sorted(sampler.process_names)

    stats = crawler.stats.get_stats() if crawler.stats else {}
    record["stats"] = {
        key: value if isinstance(value, (int, float, str)) else str(value)
        for key, value in stats.items()
    }
    Path(spec["output"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
