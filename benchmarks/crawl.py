"""Run one benchmark crawl in a fresh process and write what happened as JSON.

Usage: ``python -m benchmarks.crawl SPEC.json``, from the repository root with the
repository and ``example_project/`` on ``PYTHONPATH`` (``benchmarks.harness`` starts
it so). Each crawl runs in its own process because a Twisted reactor cannot be
restarted.

The spec is a JSON object with these keys:

- ``settings``: the Scrapy settings;
- ``start``: the start URLs;
- ``follow``: whether to follow links that stay on the page's host;
- ``bundle_cpu``: whether to time the bundle's own code;
- ``measure_registry``: whether to size the bundle's domain registry at close;
- ``retain_kb`` and ``retain_seconds``: memory each callback keeps, and for how
  long (0 seconds keeps it to the end);
- ``output``: the path of the JSON record to write.

The spider is the same for every profile, and only the settings differ. Times in
the record are on the monotonic clock shared with the fault site's log. The record
contains the crawl's start and end and the fate (callback or errback) of each
request the spider yielded, by id. It also contains the attempts the client sent
per host and when, the Retry-After rejections it received, the circuit signals, the
final stats and the process CPU time. For the bundle it adds the bundle's CPU time
and its registry's size.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import pkgutil
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urldefrag, urlsplit

import scrapy
from example_project.spiders.docs import build_link_extractor, is_same_origin
from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.http import HtmlResponse, Response
from twisted.python.failure import Failure

from benchmarks.sizing import registry_bytes, synthetic_registry_bytes

logger = logging.getLogger(__name__)

#: Statuses whose Retry-After header the record keeps, as the site log does.
REJECTION_STATUSES = (429, 503)

#: Meta key with the spider's own id of a request. Retries and held copies keep
#: their meta, so the id follows a request to its callback or errback.
ID_KEY = "bench_id"

#: Signals of the bundle recorded with their time and domain. Names missing from
#: ``scrapy_resilience.signals`` are skipped, so stock crawls and older bundles work.
RESILIENCE_SIGNALS = (
    "circuit_opened",
    "circuit_half_opened",
    "circuit_closed",
    "domain_given_up",
    "memory_pressure_changed",
)

#: The bundle's classes that Scrapy does not build itself: their methods run as
#: signal handlers and reactor timers, or on behalf of the components.
BUNDLE_CLASSES = (
    "scrapy_resilience.runtime.Runtime",
    "scrapy_resilience.hold.RequestHold",
)


def bundle_class_paths(package: str = "scrapy_resilience") -> list[str]:
    """Return the dotted paths of the bundle's classes whose methods Scrapy calls.

    These are BUNDLE_CLASSES and every class of the package with ``from_crawler``
    (middlewares and extensions), found by importing each module, so a component
    added later is timed too. A module that fails to import is skipped.
    """
    paths = list(BUNDLE_CLASSES)
    root = importlib.import_module(package)
    for module_info in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            is_component = isinstance(value, type) and hasattr(value, "from_crawler")
            if is_component and value.__module__ == module.__name__:
                paths.append(f"{module.__name__}.{name}")
    return sorted(set(paths))


class BundleTimer:
    """Accumulate the thread CPU time spent inside the bundle's methods.

    Every plain method of the instrumented classes is wrapped. Only the outermost
    call in each thread is timed, so a middleware hook that calls into the runtime
    counts once. Methods that run in a worker thread (the memory guard measures
    there) are timed in that thread and added, so the total is CPU time over all
    threads. The cost of the wrappers themselves is inside the measurement, so the
    figure errs on the high side. Time the engine spends because of the bundle (a
    held request scheduled again, for instance) is not bundle code and is not
    counted.
    """

    def __init__(self) -> None:
        self.nanoseconds = 0
        self.calls = 0
        self.instrumented: list[str] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def instrument(self, path: str) -> None:
        """Wrap the methods of the class at dotted ``path``; skip it when it is missing."""
        module_name, _dot, class_name = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type):
            return

        for name, value in list(vars(cls).items()):
            if name.startswith("__") or not inspect.isfunction(value):
                continue
            # Generators and coroutines run their bodies after the call returns,
            # outside any wrapper, so wrapping them would time nothing useful.
            if inspect.isgeneratorfunction(value) or inspect.iscoroutinefunction(value):
                continue
            if inspect.isasyncgenfunction(value):
                continue
            setattr(cls, name, self._wrap(value))
        self.instrumented.append(path)

    def _wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        accepted = _accepted_keywords(function)
        local = self._local

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            # PyDispatcher passes every keyword to a receiver that takes **kwargs,
            # as this wrapper does; drop those the real method does not take.
            if accepted is not None:
                kwargs = {key: value for key, value in kwargs.items() if key in accepted}
            if getattr(local, "depth", 0):
                return function(*args, **kwargs)

            local.depth = 1
            started = time.thread_time_ns()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.thread_time_ns() - started
                local.depth = 0
                with self._lock:
                    self.nanoseconds += elapsed
                    self.calls += 1

        return timed


def _accepted_keywords(function: Callable[..., Any]) -> frozenset[str] | None:
    """Return the keyword names ``function`` takes, or None when it takes any."""
    parameters = inspect.signature(function).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return frozenset(
        parameter.name
        for parameter in parameters
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


class BenchSpider(scrapy.Spider):
    """Request every start URL, follow same-origin links, and record each fate.

    Each request the spider yields gets an id in its meta; ``parse`` and ``failed``
    record the id, so a request that reaches neither is lost. Links are followed
    once each (the spider keeps its own set), so Scrapy's dupefilter drops nothing
    the spider yielded.
    """

    name = "bench"

    def __init__(self, spec: dict[str, Any], record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.record = record
        self.link_extractor = build_link_extractor()
        self.requested: set[str] = set()
        self.retain_bytes = int(spec.get("retain_kb", 0)) * 1024
        self.retain_seconds = float(spec.get("retain_seconds", 0.0))
        self.retained: dict[int, bytes] = {}

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> BenchSpider:
        spider: BenchSpider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider._sent, signal=signals.request_reached_downloader)
        crawler.signals.connect(spider._received, signal=signals.response_downloaded)
        crawler.signals.connect(spider._opened, signal=signals.spider_opened)
        crawler.signals.connect(spider._closed, signal=signals.spider_closed)
        _connect_resilience_signals(crawler, spider.record["events"])
        return spider

    async def start(self) -> AsyncIterator[scrapy.Request]:
        for url in self.spec["start"]:
            request = self._request(url)
            if request is not None:
                yield request

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        now = time.monotonic()
        self.record["callbacks"].append(
            [response.meta.get(ID_KEY), response.url, response.status, now]
        )
        if not isinstance(response, HtmlResponse):
            return
        if self.retain_bytes:
            self._retain(response.meta.get(ID_KEY, len(self.retained)))

        yield {"url": response.url}
        if not self.spec.get("follow", True):
            return
        for link in self.link_extractor.extract_links(response):
            if is_same_origin(link.url, response.url):
                request = self._request(link.url)
                if request is not None:
                    yield request

    def failed(self, failure: Failure) -> None:
        request = getattr(failure, "request", None)
        meta = request.meta if request is not None else {}
        url = request.url if request is not None else None
        self.record["errbacks"].append(
            [meta.get(ID_KEY), url, type(failure.value).__name__, time.monotonic()]
        )

    def _retain(self, key: int) -> None:
        # Filled bytes, so the pages are touched and count in RSS.
        self.retained[key] = b"r" * self.retain_bytes
        if self.retain_seconds > 0:
            from twisted.internet import reactor
            from twisted.internet.base import ReactorBase

            release = functools.partial(self.retained.pop, key, None)
            cast(ReactorBase, reactor).callLater(self.retain_seconds, release)

    def _request(self, url: str) -> scrapy.Request | None:
        url = urldefrag(url).url
        if url in self.requested:
            return None
        self.requested.add(url)
        request_id = self.record["yielded"]
        self.record["yielded"] += 1
        return scrapy.Request(
            url, callback=self.parse, errback=self.failed, meta={ID_KEY: request_id}
        )

    def _sent(self, request: scrapy.Request, spider: scrapy.Spider) -> None:
        # request_reached_downloader fires after every process_request passed, so
        # each call is an attempt that goes to the download handler.
        host = urlsplit(request.url).hostname or ""
        sent = self.record["sent"]
        sent[host] = sent.get(host, 0) + 1
        self.record["sent_log"].append([host, time.monotonic()])

    def _received(self, response: Response, request: scrapy.Request, spider: scrapy.Spider) -> None:
        # response_downloaded fires when the handler returns, before any middleware
        # processes the response: the moment the client has the Retry-After header.
        if response.status not in REJECTION_STATUSES:
            return
        retry_after = response.headers.get("Retry-After")
        if retry_after is None or not retry_after.strip().isdigit():
            return
        host = urlsplit(request.url).hostname or ""
        self.record["rejections_received"].append([host, time.monotonic(), int(retry_after)])

    def _opened(self, spider: scrapy.Spider) -> None:
        self.record["opened"] = time.monotonic()
        self.record["cpu_opened"] = time.process_time()

    def _closed(self, spider: scrapy.Spider, reason: str) -> None:
        # Before the registry is measured, so the measurement is not counted.
        self.record["cpu_closed"] = time.process_time()
        self.record["close_reason"] = reason
        if self.spec.get("measure_registry"):
            self.record["registry"] = _measure_registry(self.crawler)
        self.record["bundle_state"] = _bundle_state(self.crawler)


def _connect_resilience_signals(crawler: Any, events: list[Any]) -> None:
    try:
        from scrapy_resilience import signals as resilience_signals
    except ImportError:
        return

    for name in RESILIENCE_SIGNALS:
        signal = getattr(resilience_signals, name, None)
        if signal is None:
            continue

        def record_event(signal_name: str = name, **kwargs: Any) -> None:
            events.append([signal_name, kwargs.get("domain"), time.monotonic()])

        crawler.signals.connect(record_event, signal=signal, weak=False)


def _find_runtime(crawler: Any) -> Any:
    try:
        from scrapy_resilience.runtime import Runtime
    except ImportError:
        return None
    return Runtime.find(crawler)


def _measure_registry(crawler: Any) -> dict[str, Any] | None:
    """Return the live registry's size, and a tracemalloc check on a synthetic one."""
    runtime = _find_runtime(crawler)
    if runtime is None:
        return None
    registry = runtime.registry
    total, domains = registry_bytes(registry)
    synthetic_total, synthetic_domains = synthetic_registry_bytes(registry.config, 10_000)
    return {
        "domains": domains,
        "bytes": total,
        "synthetic_domains": synthetic_domains,
        "synthetic_traced_bytes": synthetic_total,
    }


def _bundle_state(crawler: Any) -> dict[str, Any] | None:
    """Return what the bundle's registry ended with: delays, circuits, unfinished."""
    runtime = _find_runtime(crawler)
    if runtime is None:
        return None
    states = list(runtime.registry)
    return {
        "domains": len(states),
        # The adaptive throttle sets throttle_delay; it stays 0 until it lands.
        "max_throttle_delay": max((state.throttle_delay for state in states), default=0.0),
        "throttled_domains": sum(1 for state in states if state.throttle_delay > 0),
        "given_up": sorted(state.key for state in states if state.circuit.given_up),
        "unfinished": len(runtime.unfinished),
    }


def raise_open_file_limit() -> None:
    """Raise the soft limit of open files to the hard one: scale crawls keep a
    connection per host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the crawl of ``spec`` in this process and return its record."""
    record: dict[str, Any] = {
        "yielded": 0,
        "callbacks": [],
        "errbacks": [],
        "sent": {},
        "sent_log": [],
        "rejections_received": [],
        "events": [],
        "close_reason": None,
        "registry": None,
        "bundle_state": None,
    }
    timer = BundleTimer()
    if spec.get("bundle_cpu"):
        for path in bundle_class_paths():
            timer.instrument(path)

    process = CrawlerProcess(spec["settings"])
    crawler = process.create_crawler(BenchSpider)
    started = time.monotonic()
    process.crawl(crawler, spec=spec, record=record)
    process.start()
    record["started"] = started
    record["finished"] = time.monotonic()

    record["bundle_cpu_ns"] = timer.nanoseconds if spec.get("bundle_cpu") else None
    record["bundle_calls"] = timer.calls
    record["instrumented"] = timer.instrumented
    stats = crawler.stats.get_stats() if crawler.stats else {}
    record["stats"] = {
        key: value if isinstance(value, (int, float, str)) else str(value)
        for key, value in stats.items()
    }
    return record


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    raise_open_file_limit()
    record = run(spec)
    Path(spec["output"]).write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
