"""The memory guard: lower the downloader's concurrency under memory pressure,
and raise it back once memory is freed.

Every ``RESILIENCE_MEMORY_CHECK_INTERVAL`` seconds the guard measures the
memory of the Scrapy process and all its descendants (browser and driver
processes included) in a worker thread, so the measurement does not run on
the reactor thread. RSS summed over a tree counts each shared page once per
process that maps it, so decisions rest on PSS (USS where the platform has no
PSS). The guard sums RSS on every check, which is cheap, and scans PSS when
:class:`~scrapy_resilience.core.memory.TreeMemoryEstimate` reports a full scan
due. The rules that turn samples into changes live in
:class:`~scrapy_resilience.core.memory.MemoryPolicy`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil
from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro
from twisted.internet import threads
from twisted.internet.task import LoopingCall

from scrapy_resilience import signals as resilience_signals
from scrapy_resilience.core.memory import (
    MB,
    Action,
    CgroupLimit,
    Change,
    MemoryPolicy,
    MemoryPolicyConfig,
    TreeMemoryEstimate,
    effective_limit_mb,
    find_cgroup_memory_limit,
)
from scrapy_resilience.runtime import Runtime
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

    from scrapy_resilience.settings import Config

logger = logging.getLogger(__name__)

RunInThread = Callable[..., "Deferred[Any]"]


class MemorySample(NamedTuple):
    """One measurement of the process tree; memory in MB, CPU time in seconds.

    ``memory_mb`` is what the rules use: the full scan when ``full`` is True,
    else the estimate from ``rss_mb``. ``cpu_seconds`` is the CPU time the
    measuring thread spent on it.
    """

    memory_mb: float
    rss_mb: float
    full: bool
    processes: int
    available_mb: float | None
    cpu_seconds: float


class LimitInForce(NamedTuple):
    """The memory limit the guard applies, and where it comes from."""

    limit_mb: float
    source: str
    cgroup: CgroupLimit | None


def choose_limit(
    setting_mb: float, cgroup: CgroupLimit | None, cgroup_share: float
) -> LimitInForce:
    """Return the lower of ``RESILIENCE_MEMORY_LIMIT_MB`` and ``cgroup_share`` of
    the cgroup limit (ignored when ``cgroup_share`` is 0)."""
    if cgroup is not None and cgroup_share > 0:
        share_mb = cgroup.limit_mb * cgroup_share
        if share_mb < setting_mb:
            source = (
                f"{cgroup_share:g} of the cgroup v{cgroup.version} limit of "
                f"{cgroup.limit_mb:.0f} MB in {cgroup.path}"
            )
            return LimitInForce(share_mb, source, cgroup)
    return LimitInForce(setting_mb, "RESILIENCE_MEMORY_LIMIT_MB", cgroup)


def read_cgroup_limit() -> CgroupLimit | None:
    """Return the cgroup memory limit of this process, or None (no cgroup, no limit,
    or not Linux)."""
    proc_cgroup = _read_text("/proc/self/cgroup")
    mountinfo = _read_text("/proc/self/mountinfo")
    if proc_cgroup is None or mountinfo is None:
        return None
    return find_cgroup_memory_limit(proc_cgroup, mountinfo, _read_text)


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


class ProcessTreeSampler:
    """Measure the memory of a process and all its descendants with psutil.

    :meth:`full_mb` sums PSS on Linux and USS elsewhere, and ``kind`` names the
    measure. A process whose full memory cannot be read (permission denied)
    counts with its RSS. Processes that exit during a measurement are skipped.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.process = psutil.Process(pid)
        self.kind = "PSS" if sys.platform.startswith("linux") else "USS"

    def tree(self) -> list[psutil.Process]:
        """Return the process and its descendants alive now."""
        try:
            return [self.process, *self.process.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return [self.process]

    def rss_mb(self, processes: list[psutil.Process]) -> float:
        """Return the RSS summed over ``processes``, in MB."""
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total / MB

    def full_mb(self, processes: list[psutil.Process]) -> float:
        """Return PSS (or USS) summed over ``processes``, in MB."""
        total = 0
        for process in processes:
            try:
                info = process.memory_full_info()
                total += getattr(info, "pss", None) or info.uss
            except psutil.AccessDenied:
                total += self._rss_or_zero(process)
            except psutil.NoSuchProcess:
                continue
        return total / MB

    @staticmethod
    def available_mb() -> float:
        """Return the memory the system can still give without swapping, in MB."""
        return float(psutil.virtual_memory().available) / MB

    @staticmethod
    def _rss_or_zero(process: psutil.Process) -> int:
        try:
            return int(process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0


class MemoryGuard:
    """Lower ``engine.downloader.total_concurrency`` when the crawl's process tree
    uses more memory than the limit, and raise it back once memory is freed.

    ``sampler``, ``clock``, ``run_in_thread`` and ``cgroup_limit`` replace the
    real process tree, monotonic clock, worker thread and cgroup lookup in tests.
    """

    def __init__(
        self,
        crawler: Crawler,
        *,
        sampler: ProcessTreeSampler | None = None,
        clock: Callable[[], float] = time.monotonic,
        run_in_thread: RunInThread | None = None,
        cgroup_limit: Callable[[], CgroupLimit | None] = read_cgroup_limit,
    ) -> None:
        if not get_bool(crawler.settings, "RESILIENCE_MEMORY_ENABLED"):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        config = self.runtime.config
        self.interval = config.memory_check_interval
        self.settings = config.memory
        self.sampler = sampler or ProcessTreeSampler()
        self.clock = clock
        self._run_in_thread: RunInThread = run_in_thread or threads.deferToThread

        self.max_concurrency = max(1, crawler.settings.getint("CONCURRENT_REQUESTS"))
        cgroup = cgroup_limit() if self.settings.cgroup_share > 0 else None
        self.limit = choose_limit(config.memory_limit_mb, cgroup, self.settings.cgroup_share)
        self.policy = MemoryPolicy(
            _policy_config(config, self.limit.limit_mb, self.max_concurrency)
        )
        self.estimate = TreeMemoryEstimate(self.settings.full_scan_interval)

        #: The last sample taken, or None before the first; the health monitor reads it.
        self.last_sample: MemorySample | None = None
        #: CPU time the guard spent measuring and deciding, in seconds.
        self.cpu_seconds = 0.0
        self._task: LoopingCall | None = None
        self._closed = False
        self._warned_at_minimum = False
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    @property
    def limit_mb(self) -> float:
        """The memory limit in force, in MB."""
        return self.limit.limit_mb

    # Signal handlers

    def spider_opened(self, spider: Spider) -> None:
        stats = self.runtime.stats
        stats.set_value("resilience/memory/limit_mb", round(self.limit_mb, 1))
        stats.set_value("resilience/memory/limit_source", self.limit.source)
        logger.info(
            "Memory guard: limit %(limit).0f MB (%(source)s), low-water mark %(low).0f MB; "
            "checking the %(measure)s of the Scrapy process and its descendants every "
            "%(interval)gs",
            {
                "limit": self.limit_mb,
                "source": self.limit.source,
                "low": self.policy.config.low_water_mb,
                "measure": self.sampler.kind,
                "interval": self.interval,
            },
            extra={"spider": spider},
        )
        self._warn_hard_limit_above_cgroup(spider)
        self._task = LoopingCall(self._check)
        self._task.start(self.interval, now=True)

    def spider_closed(self, spider: Spider, reason: str) -> None:
        self._closed = True
        if self._task is not None and self._task.running:
            self._task.stop()

    # Checks

    def _check(self) -> Deferred[Any]:
        """Measure in a worker thread, then apply the rules on the reactor thread."""
        deferred = self._run_in_thread(self._measure, self.policy.reduced)
        deferred.addCallback(self._apply)
        deferred.addErrback(self._log_failure)
        return deferred

    def _measure(self, reduced: bool) -> MemorySample:
        """Measure the process tree; runs in a worker thread."""
        started = time.thread_time()
        processes = self.sampler.tree()
        rss_mb = self.sampler.rss_mb(processes)
        now = self.clock()
        available_mb = None
        if self.settings.min_available_mb > 0:
            available_mb = self.sampler.available_mb()

        # The low-water mark of the limit this sample will be judged against.
        estimate = self.estimate.estimate(rss_mb)
        limit_mb = effective_limit_mb(
            self.limit_mb,
            rss_mb if estimate is None else estimate,
            available_mb,
            self.settings.min_available_mb,
        )
        low_water_mb = self.policy.config.low_water_share * limit_mb

        full = self.estimate.full_scan_due(rss_mb, now, low_water_mb, reduced)
        if full:
            memory_mb = self.sampler.full_mb(processes)
            self.estimate.calibrate(memory_mb, rss_mb, now)
        else:
            memory_mb = rss_mb if estimate is None else estimate
        cpu_seconds = time.thread_time() - started
        return MemorySample(memory_mb, rss_mb, full, len(processes), available_mb, cpu_seconds)

    def _apply(self, sample: MemorySample) -> None:
        if self._closed:
            return
        started = time.thread_time()
        self.last_sample = sample
        self._record(sample)

        engine = self.crawler.engine
        if engine is None:
            return
        downloader = engine.downloader
        limit_mb = effective_limit_mb(
            self.limit_mb, sample.memory_mb, sample.available_mb, self.settings.min_available_mb
        )
        change = self.policy.observe(
            sample.memory_mb, downloader.total_concurrency, self.clock(), limit_mb
        )
        if change is not None:
            self._act(change, sample.memory_mb, limit_mb)
        else:
            self._warn_at_minimum(sample.memory_mb, limit_mb, downloader.total_concurrency)
        self._add_cpu_seconds(time.thread_time() - started)

    def _record(self, sample: MemorySample) -> None:
        stats = self.runtime.stats
        stats.inc_value("resilience/memory/checks")
        if sample.full:
            stats.inc_value("resilience/memory/full_scans")
        stats.max_value("resilience/memory/max_mb", round(sample.memory_mb, 1))
        self._add_cpu_seconds(sample.cpu_seconds)

    def _add_cpu_seconds(self, seconds: float) -> None:
        self.cpu_seconds += seconds
        self.runtime.stats.set_value("resilience/memory/cpu_seconds", round(self.cpu_seconds, 4))

    def _log_failure(self, failure: Any) -> None:
        logger.error(
            "Memory check failed: %(error)s",
            {"error": failure.getErrorMessage()},
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
            extra={"spider": self.crawler.spider},
        )

    # Changes

    def _act(self, change: Change, memory_mb: float, limit_mb: float) -> None:
        if change.action is Action.CLOSE:
            self._close_spider(change, memory_mb, limit_mb)
            return

        engine = self.crawler.engine
        assert engine is not None
        # Lowering takes effect as requests in flight finish; raising, at the
        # engine's next pass (its heartbeat runs every 5 s).
        engine.downloader.total_concurrency = change.new_concurrency
        # NOTE: with scrapy-playwright, the open browser pages should also be
        # kept within the lowered concurrency; the guard does not limit them yet.

        stats = self.runtime.stats
        if change.action is Action.LOWER:
            stats.inc_value("resilience/memory/reductions")
            stats.min_value("resilience/memory/min_concurrency", change.new_concurrency)
            message = (
                "Memory %(memory).0f MB is above the limit of %(limit).0f MB: lowering "
                "concurrency from %(old)d to %(new)d"
            )
        else:
            stats.inc_value("resilience/memory/restorations")
            message = (
                "Memory %(memory).0f MB stayed below %(low).0f MB for %(samples)d checks: "
                "raising concurrency from %(old)d to %(new)d"
            )
        logger.info(
            message,
            {
                "memory": memory_mb,
                "limit": limit_mb,
                "low": self.policy.config.low_water_share * limit_mb,
                "samples": self.policy.config.restore_samples,
                "old": change.old_concurrency,
                "new": change.new_concurrency,
            },
            extra={"spider": self.crawler.spider},
        )
        self.crawler.signals.send_catch_log(
            resilience_signals.memory_pressure_changed,
            old_concurrency=change.old_concurrency,
            new_concurrency=change.new_concurrency,
            memory_mb=memory_mb,
            limit_mb=limit_mb,
        )

    def _close_spider(self, change: Change, memory_mb: float, limit_mb: float) -> None:
        config = self.policy.config
        if config.hard_limit_mb is not None and memory_mb > config.hard_limit_mb:
            explanation = f"above the hard limit of {config.hard_limit_mb:.0f} MB"
        else:
            explanation = (
                f"above the limit of {limit_mb:.0f} MB for {config.close_after_seconds:g}s "
                f"at the minimum concurrency of {change.old_concurrency}"
            )
        logger.error(
            "Memory %(memory).0f MB is %(explanation)s: closing the spider (%(reason)s)",
            {"memory": memory_mb, "explanation": explanation, "reason": change.reason},
            extra={"spider": self.crawler.spider},
        )
        engine = self.crawler.engine
        if engine is None or engine.spider is None:
            return
        if hasattr(engine, "close_spider_async"):
            deferred_from_coro(engine.close_spider_async(reason=change.reason))
        else:  # Scrapy before 2.14
            engine.close_spider(engine.spider, change.reason)

    def _warn_at_minimum(self, memory_mb: float, limit_mb: float, concurrency: int) -> None:
        """Warn once per episode that memory stays above the limit at the minimum."""
        if memory_mb <= limit_mb:
            self._warned_at_minimum = False
            return
        if self._warned_at_minimum or concurrency > self.policy.config.min_concurrency:
            return
        self._warned_at_minimum = True
        logger.warning(
            "Memory %(memory).0f MB is still above the limit of %(limit).0f MB at the minimum "
            "concurrency of %(concurrency)d. Lowering concurrency does not free memory held "
            "outside the downloader, such as by callbacks, pipelines or browser processes",
            {"memory": memory_mb, "limit": limit_mb, "concurrency": concurrency},
            extra={"spider": self.crawler.spider},
        )

    def _warn_hard_limit_above_cgroup(self, spider: Spider) -> None:
        hard_limit_mb = self.policy.config.hard_limit_mb
        cgroup = self.limit.cgroup
        if hard_limit_mb is None or cgroup is None or hard_limit_mb < cgroup.limit_mb:
            return
        logger.warning(
            "RESILIENCE_MEMORY_HARD_LIMIT_MB (%(hard).0f MB) is at or above the cgroup limit "
            "of %(cgroup).0f MB in %(path)s: the kernel stops the job before the guard closes "
            "the spider; set it lower",
            {"hard": hard_limit_mb, "cgroup": cgroup.limit_mb, "path": cgroup.path},
            extra={"spider": spider},
        )


def _policy_config(config: Config, limit_mb: float, max_concurrency: int) -> MemoryPolicyConfig:
    memory = config.memory
    return MemoryPolicyConfig(
        limit_mb=limit_mb,
        max_concurrency=max_concurrency,
        min_concurrency=min(memory.min_concurrency, max_concurrency),
        low_water_share=memory.low_water_share,
        restore_samples=memory.restore_samples,
        decrease_factor=memory.decrease_factor,
        restore_step=max(1, round(max_concurrency * memory.restore_step_share)),
        hard_limit_mb=memory.hard_limit_mb,
        close_after_seconds=memory.close_after_seconds,
    )
