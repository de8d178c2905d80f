"""The memory guard's rules with a fake clock and a fake sampler, the cgroup limit
search against fixture files, and the guard wired to a crawler without a reactor."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from scrapy.exceptions import NotConfigured
from scrapy.utils.test import get_crawler
from twisted.internet import defer

from scrapy_resilience import signals as resilience_signals
from scrapy_resilience.core.memory import (
    MB,
    Action,
    CgroupLimit,
    MemoryPolicy,
    MemoryPolicyConfig,
    TreeMemoryEstimate,
    effective_limit_mb,
    find_cgroup_memory_limit,
    parse_mountinfo,
    parse_proc_cgroup,
)
from scrapy_resilience.extensions.memory import MemoryGuard, ProcessTreeSampler, choose_limit

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
LIMIT = 100.0


def make_policy(**overrides: Any) -> MemoryPolicy:
    options: dict[str, Any] = {"limit_mb": LIMIT, "max_concurrency": 16, **overrides}
    return MemoryPolicy(MemoryPolicyConfig(**options))


def lower_until_none(policy: MemoryPolicy, concurrency: int, memory_mb: float) -> list[int]:
    """Feed samples that never fall and return each concurrency the policy sets."""
    steps = []
    for now in range(20):
        change = policy.observe(memory_mb, concurrency, float(now))
        if change is None:
            break
        assert change.action is Action.LOWER
        concurrency = change.new_concurrency
        steps.append(concurrency)
    return steps


# Lowering


def test_policy_lowers_by_half_to_minimum() -> None:
    policy = make_policy()
    assert lower_until_none(policy, 16, 150.0) == [8, 4, 2, 1]
    assert policy.reductions == 4
    assert policy.lowest_concurrency == 1


def test_policy_never_below_min_concurrency() -> None:
    policy = make_policy(min_concurrency=3)
    assert lower_until_none(policy, 16, 150.0) == [8, 4, 3]


def test_policy_lowers_at_least_one() -> None:
    policy = make_policy(decrease_factor=0.9)
    assert lower_until_none(policy, 3, 150.0) == [2, 1]


def test_policy_waits_while_memory_falls() -> None:
    policy = make_policy()
    first = policy.observe(200.0, 16, 0.0)
    assert first is not None
    assert first.new_concurrency == 8

    assert policy.observe(180.0, 8, 1.0) is None
    assert policy.observe(160.0, 8, 2.0) is None
    # A fall under 1% of the limit is noise: lower again.
    again = policy.observe(159.5, 8, 3.0)
    assert again is not None
    assert again.new_concurrency == 4


def test_policy_lowers_at_new_episode() -> None:
    policy = make_policy()
    assert policy.observe(200.0, 16, 0.0) is not None
    assert policy.observe(90.0, 8, 1.0) is None
    change = policy.observe(101.0, 8, 2.0)
    assert change is not None
    assert change.new_concurrency == 4


# Restoring


def test_policy_restores_after_low_samples() -> None:
    policy = make_policy(restore_samples=3, restore_step=2)
    policy.observe(150.0, 16, 0.0)

    assert policy.observe(50.0, 8, 1.0) is None
    assert policy.observe(50.0, 8, 2.0) is None
    change = policy.observe(50.0, 8, 3.0)
    assert change is not None
    assert change.action is Action.RAISE
    assert (change.old_concurrency, change.new_concurrency) == (8, 10)
    assert policy.restorations == 1


def test_policy_low_run_broken_by_middle_sample() -> None:
    policy = make_policy(restore_samples=3)
    policy.observe(150.0, 16, 0.0)

    assert policy.observe(50.0, 8, 1.0) is None
    assert policy.observe(50.0, 8, 2.0) is None
    assert policy.observe(85.0, 8, 3.0) is None  # above the low-water mark of 80
    assert policy.observe(50.0, 8, 4.0) is None
    assert policy.observe(50.0, 8, 5.0) is None
    assert policy.observe(50.0, 8, 6.0) is not None


def test_policy_restores_step_by_step_to_max() -> None:
    policy = make_policy(restore_samples=1, restore_step=5)
    policy.observe(150.0, 16, 0.0)
    policy.observe(150.0, 8, 1.0)

    concurrency = 4
    seen = []
    for now in range(2, 10):
        change = policy.observe(10.0, concurrency, float(now))
        if change is None:
            break
        concurrency = change.new_concurrency
        seen.append(concurrency)
    assert seen == [9, 14, 16]
    assert policy.observe(10.0, 16, 20.0) is None


def test_policy_raises_only_own_reductions() -> None:
    policy = make_policy(restore_samples=1)
    for now in range(5):
        assert policy.observe(10.0, 4, float(now)) is None


# Closing


def test_policy_hard_limit_closes_once() -> None:
    policy = make_policy(hard_limit_mb=300.0)
    change = policy.observe(301.0, 16, 0.0)
    assert change is not None
    assert change.action is Action.CLOSE
    assert change.reason == "resilience_memory_hard_limit"
    assert change.new_concurrency == 16
    assert policy.observe(400.0, 16, 1.0) is None


def test_policy_closes_after_timeout_at_minimum() -> None:
    policy = make_policy(min_concurrency=2, close_after_seconds=10.0)
    assert policy.observe(150.0, 2, 0.0) is None
    assert policy.observe(150.0, 2, 9.9) is None
    change = policy.observe(150.0, 2, 10.0)
    assert change is not None
    assert change.action is Action.CLOSE
    assert change.reason == "resilience_memory_not_freed"
    assert policy.observe(150.0, 2, 11.0) is None


def test_policy_timeout_restarts_below_limit() -> None:
    policy = make_policy(min_concurrency=2, close_after_seconds=10.0)
    assert policy.observe(150.0, 2, 0.0) is None
    assert policy.observe(90.0, 2, 8.0) is None
    assert policy.observe(150.0, 2, 12.0) is None
    assert policy.observe(150.0, 2, 21.9) is None
    assert policy.observe(150.0, 2, 22.0) is not None


def test_policy_never_closes_without_timeout() -> None:
    policy = make_policy(min_concurrency=2)
    for now in range(0, 10_000, 100):
        assert policy.observe(150.0, 2, float(now)) is None


def test_policy_limit_override_per_sample() -> None:
    policy = make_policy()
    change = policy.observe(60.0, 16, 0.0, limit_mb=50.0)
    assert change is not None
    assert change.action is Action.LOWER
    assert policy.peak_mb == 60.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("limit_mb", 0),
        ("min_concurrency", 0),
        ("low_water_share", 1.0),
        ("restore_samples", 0),
        ("decrease_factor", 1.0),
        ("restore_step", 0),
    ],
)
def test_policy_config_rejects_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MemoryPolicyConfig(**{"limit_mb": LIMIT, "max_concurrency": 16, field: value})


def test_effective_limit_follows_available_memory() -> None:
    assert effective_limit_mb(512.0, 300.0, 100.0, 0.0) == 512.0
    assert effective_limit_mb(512.0, 300.0, None, 200.0) == 512.0
    assert effective_limit_mb(512.0, 300.0, 1000.0, 200.0) == 512.0
    assert effective_limit_mb(512.0, 300.0, 250.0, 200.0) == 350.0
    assert effective_limit_mb(512.0, 300.0, 10.0, 400.0) == 1.0


# Estimate between full scans


def test_estimate_growth_full_fall_scaled() -> None:
    estimate = TreeMemoryEstimate(full_scan_interval=30.0)
    assert estimate.estimate(1000.0) is None

    estimate.calibrate(full_mb=500.0, rss_mb=1000.0, now=0.0)
    assert estimate.estimate(1000.0) == 500.0
    assert estimate.estimate(1200.0) == 700.0
    assert estimate.estimate(800.0) == 400.0


def test_full_scan_due_rules() -> None:
    estimate = TreeMemoryEstimate(full_scan_interval=30.0)
    assert estimate.full_scan_due(100.0, 0.0, low_water_mb=400.0, reduced=False)

    estimate.calibrate(full_mb=200.0, rss_mb=300.0, now=0.0)
    assert not estimate.full_scan_due(300.0, 10.0, low_water_mb=400.0, reduced=False)
    assert estimate.full_scan_due(300.0, 30.0, low_water_mb=400.0, reduced=False)
    assert estimate.full_scan_due(500.0, 10.0, low_water_mb=400.0, reduced=False)
    assert estimate.full_scan_due(300.0, 10.0, low_water_mb=400.0, reduced=True)


# cgroup limits


def fixture_reader(case: str) -> Any:
    root = FIXTURES / case / "root"

    def read(path: str) -> str | None:
        file = root / path.lstrip("/")
        return file.read_text() if file.is_file() else None

    return read


def find_fixture_limit(case: str) -> CgroupLimit | None:
    folder = FIXTURES / case
    return find_cgroup_memory_limit(
        (folder / "proc-self-cgroup").read_text(),
        (folder / "proc-self-mountinfo").read_text(),
        fixture_reader(case),
    )


CGROUP_CASES = [
    ("v2-container", CgroupLimit(2, "/sys/fs/cgroup/memory.max", 512 * MB)),
    (
        "v2-systemd-ancestor",
        CgroupLimit(2, "/sys/fs/cgroup/user.slice/user-1000.slice/memory.max", 2048 * MB),
    ),
    ("v2-unlimited", None),
    ("v2-outside-namespace", CgroupLimit(2, "/sys/fs/cgroup/memory.max", 1024 * MB)),
    ("v1-docker", CgroupLimit(1, "/sys/fs/cgroup/memory/memory.limit_in_bytes", 256 * MB)),
    (
        "v1-hierarchical",
        CgroupLimit(1, "/sys/fs/cgroup/memory/jobs/job-7/memory.stat", 1024 * MB),
    ),
    ("hybrid-unlimited", None),
    ("no-memory-controller", None),
]


@pytest.mark.parametrize(("case", "expected"), CGROUP_CASES)
def test_cgroup_limit_from_fixture(case: str, expected: CgroupLimit | None) -> None:
    assert find_fixture_limit(case) == expected


def test_cgroup_fixture_cases_all_listed() -> None:
    folders = {path.name for path in FIXTURES.iterdir() if path.is_dir()}
    assert folders == {case for case, _ in CGROUP_CASES}


def test_cgroup_limit_missing_files() -> None:
    text = (FIXTURES / "v2-container" / "proc-self-mountinfo").read_text()
    assert find_cgroup_memory_limit("0::/\n", text, lambda path: None) is None
    assert find_cgroup_memory_limit("", "", lambda path: "1024") is None


def test_mountinfo_escapes_and_malformed_lines() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw\n"
        "garbage line\n"
        "37 35 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    mounts = parse_mountinfo(text)
    assert len(mounts) == 2
    assert mounts[0].mount_point == "/mnt two"
    assert mounts[0].root == "/mnt1"
    assert mounts[0].filesystem == "ext3"
    assert mounts[1].super_options == ("rw", "nsdelegate")


def test_proc_cgroup_parsing() -> None:
    entries = parse_proc_cgroup("12:cpu,cpuacct:/a\n0::/b\nnot a line\n1:name=systemd:/\n")
    assert [entry.hierarchy for entry in entries] == [12, 0, 1]
    assert entries[0].controllers == ("cpu", "cpuacct")
    assert entries[1].controllers == ()
    assert entries[1].path == "/b"


def test_choose_limit_prefers_lower_cgroup_share() -> None:
    cgroup = CgroupLimit(2, "/sys/fs/cgroup/memory.max", 400 * MB)
    chosen = choose_limit(512.0, cgroup, 0.8)
    assert chosen.limit_mb == pytest.approx(320.0)
    assert "cgroup v2" in chosen.source
    assert "/sys/fs/cgroup/memory.max" in chosen.source

    assert choose_limit(256.0, cgroup, 0.8).limit_mb == 256.0
    assert choose_limit(512.0, cgroup, 0.0).limit_mb == 512.0
    assert choose_limit(512.0, None, 0.8).source == "RESILIENCE_MEMORY_LIMIT_MB"


# The real process tree


def test_sampler_counts_child_process() -> None:
    code = (
        "import mmap, sys\n"
        "buffer = mmap.mmap(-1, 64 * 1024 * 1024)\n"
        "for offset in range(0, len(buffer), mmap.PAGESIZE): buffer[offset] = 1\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    sampler = ProcessTreeSampler()
    alone = sampler.full_mb(sampler.tree())
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        tree = sampler.tree()
        assert child.pid in {process.pid for process in tree}
        assert sampler.full_mb(tree) - alone >= 60
        assert sampler.rss_mb(tree) >= sampler.full_mb(tree) - 1
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def test_sampler_skips_exited_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    process = psutil.Process(child.pid)
    child.wait(10)
    sampler = ProcessTreeSampler()
    assert sampler.full_mb([process]) == 0.0
    assert sampler.rss_mb([process]) == 0.0


# The guard wired to a crawler


class FakeSampler:
    """Return the memory values a test sets, for a tree of one process."""

    kind = "PSS"

    def __init__(self, memory_mb: float = 50.0) -> None:
        self.memory_mb = memory_mb
        self.full_scans = 0

    def tree(self) -> list[Any]:
        return [object()]

    def rss_mb(self, processes: list[Any]) -> float:
        return self.memory_mb

    def full_mb(self, processes: list[Any]) -> float:
        self.full_scans += 1
        return self.memory_mb

    def available_mb(self) -> float:
        # A system of 10050 MB where nothing but the tree uses memory.
        return 10_050.0 - self.memory_mb


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_now(function: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.succeed(function(*args))


def make_guard(
    settings: dict[str, Any] | None = None, cgroup: CgroupLimit | None = None
) -> tuple[MemoryGuard, FakeSampler, FakeClock, list[dict[str, Any]]]:
    crawler = get_crawler(
        settings_dict={
            "CONCURRENT_REQUESTS": 16,
            "RESILIENCE_MEMORY_LIMIT_MB": LIMIT,
            "RESILIENCE_MEMORY_RESTORE_SAMPLES": 2,
            "RESILIENCE_MEMORY_RESTORE_STEP_SHARE": 0.25,
            **(settings or {}),
        }
    )
    closed: list[str] = []

    def close_spider_async(reason: str) -> None:
        closed.append(reason)

    crawler.engine = SimpleNamespace(  # type: ignore[assignment]
        downloader=SimpleNamespace(total_concurrency=16),
        spider=object(),
        close_spider_async=close_spider_async,
        closed=closed,
    )
    sampler = FakeSampler()
    clock = FakeClock()
    guard = MemoryGuard(
        crawler,
        sampler=sampler,  # type: ignore[arg-type]
        clock=clock,
        run_in_thread=run_now,
        cgroup_limit=lambda: cgroup,
    )
    events: list[dict[str, Any]] = []
    crawler.signals.connect(
        lambda **kwargs: events.append(kwargs),
        signal=resilience_signals.memory_pressure_changed,
        weak=False,
    )
    return guard, sampler, clock, events


def check(guard: MemoryGuard, clock: FakeClock, memory_mb: float) -> None:
    guard.sampler.memory_mb = memory_mb  # type: ignore[attr-defined]
    clock.now += 1.0
    guard._check()


def concurrency(guard: MemoryGuard) -> int:
    assert guard.crawler.engine is not None
    return int(guard.crawler.engine.downloader.total_concurrency)


def test_guard_lowers_and_restores_concurrency(caplog: pytest.LogCaptureFixture) -> None:
    guard, _, clock, events = make_guard()
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.memory")

    check(guard, clock, 150.0)
    assert concurrency(guard) == 8
    check(guard, clock, 150.0)
    assert concurrency(guard) == 4
    for _ in range(4):
        check(guard, clock, 10.0)
    assert concurrency(guard) == 12
    for _ in range(2):
        check(guard, clock, 10.0)
    assert concurrency(guard) == 16

    pairs = [(event["old_concurrency"], event["new_concurrency"]) for event in events]
    assert pairs == [(16, 8), (8, 4), (4, 8), (8, 12), (12, 16)]
    assert events[0]["memory_mb"] == 150.0
    assert events[0]["limit_mb"] == LIMIT

    stats = guard.runtime.stats
    assert stats.get_value("resilience/memory/reductions") == 2
    assert stats.get_value("resilience/memory/restorations") == 3
    assert stats.get_value("resilience/memory/min_concurrency") == 4
    assert stats.get_value("resilience/memory/max_mb") == 150.0
    assert stats.get_value("resilience/memory/checks") == 8
    assert stats.get_value("resilience/memory/cpu_seconds") >= 0.0

    changes = [r for r in caplog.records if "concurrency from" in r.getMessage()]
    assert len(changes) == 5
    assert all(record.levelno == logging.INFO for record in changes)
    assert changes[0].getMessage() == (
        "Memory 150 MB is above the limit of 100 MB: lowering concurrency from 16 to 8"
    )
    assert changes[2].getMessage() == (
        "Memory 10 MB stayed below 80 MB for 2 checks: raising concurrency from 4 to 8"
    )


def test_guard_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    guard, _, clock, events = make_guard({"RESILIENCE_MEMORY_MIN_CONCURRENCY": 8})
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.memory")
    for _ in range(6):
        check(guard, clock, 150.0)
    assert len(events) == 1
    changes = [r for r in caplog.records if "concurrency from" in r.getMessage()]
    assert len(changes) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "at the minimum concurrency of 8" in warnings[0].getMessage()


def test_guard_closes_spider_on_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    guard, _, clock, events = make_guard({"RESILIENCE_MEMORY_HARD_LIMIT_MB": 200})
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.memory")
    check(guard, clock, 250.0)
    check(guard, clock, 250.0)

    assert guard.crawler.engine.closed == ["resilience_memory_hard_limit"]  # type: ignore[union-attr]
    assert events == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "above the hard limit of 200 MB" in errors[0].getMessage()


def test_guard_closes_after_timeout_at_minimum() -> None:
    guard, _, clock, _ = make_guard({"RESILIENCE_MEMORY_CLOSE_AFTER_SECONDS": 3})
    for _ in range(4):
        check(guard, clock, 150.0)
    assert concurrency(guard) == 1

    # The clock advances 1 s per check: at the minimum from the 5th check on.
    for _ in range(3):
        check(guard, clock, 150.0)
    assert guard.crawler.engine.closed == []  # type: ignore[union-attr]
    check(guard, clock, 150.0)
    assert guard.crawler.engine.closed == ["resilience_memory_not_freed"]  # type: ignore[union-attr]


def test_guard_uses_cgroup_share_as_limit() -> None:
    cgroup = CgroupLimit(2, "/sys/fs/cgroup/memory.max", 50 * MB)
    guard, _, clock, events = make_guard({"RESILIENCE_MEMORY_CGROUP_SHARE": 0.8}, cgroup)
    assert guard.limit_mb == pytest.approx(40.0)
    check(guard, clock, 45.0)
    assert concurrency(guard) == 8
    assert events[0]["limit_mb"] == pytest.approx(40.0)


def test_guard_lowers_when_system_memory_short() -> None:
    guard, _, clock, _ = make_guard({"RESILIENCE_MEMORY_MIN_AVAILABLE_MB": 10_050})
    # 50 MB used, 10000 MB available, 10050 MB to keep free: the limit falls to 1 MB.
    check(guard, clock, 50.0)
    assert concurrency(guard) == 8


def test_guard_full_scan_only_when_due() -> None:
    guard, sampler, clock, _ = make_guard({"RESILIENCE_MEMORY_FULL_SCAN_INTERVAL": 10})
    for _ in range(5):
        check(guard, clock, 20.0)
    assert sampler.full_scans == 1
    check(guard, clock, 90.0)
    assert sampler.full_scans == 2
    assert guard.runtime.stats.get_value("resilience/memory/full_scans") == 2


def test_guard_full_scan_when_system_memory_short() -> None:
    settings = {
        "RESILIENCE_MEMORY_FULL_SCAN_INTERVAL": 1000,
        "RESILIENCE_MEMORY_MIN_AVAILABLE_MB": 10_020,
    }
    guard, sampler, clock, _ = make_guard(settings)
    check(guard, clock, 5.0)
    assert sampler.full_scans == 1
    # 10020 of the system's 10050 MB to keep available: the limit falls to
    # 30 MB and its low-water mark to 24 MB, so 20 MB needs no full scan yet.
    check(guard, clock, 20.0)
    assert sampler.full_scans == 1
    check(guard, clock, 25.0)
    assert sampler.full_scans == 2


def test_guard_logs_limit_at_open(caplog: pytest.LogCaptureFixture) -> None:
    guard, _, _, _ = make_guard()
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.memory")
    spider = guard.crawler._create_spider()
    guard.spider_opened(spider)
    guard.spider_closed(spider, "finished")

    opened = [r for r in caplog.records if r.getMessage().startswith("Memory guard:")]
    assert len(opened) == 1
    assert "limit 100 MB (RESILIENCE_MEMORY_LIMIT_MB)" in opened[0].getMessage()
    assert guard.runtime.stats.get_value("resilience/memory/limit_mb") == LIMIT


def test_guard_off_raises_not_configured() -> None:
    crawler = get_crawler(settings_dict={"RESILIENCE_MEMORY_ENABLED": False})
    with pytest.raises(NotConfigured):
        MemoryGuard(crawler)


def test_settings_hard_limit_off_or_above_limit() -> None:
    from scrapy.settings import Settings

    from scrapy_resilience.settings import load_config

    assert (
        load_config(Settings({"RESILIENCE_MEMORY_HARD_LIMIT_MB": 0})).memory.hard_limit_mb is None
    )
    equal = load_config(
        Settings({"RESILIENCE_MEMORY_LIMIT_MB": 300, "RESILIENCE_MEMORY_HARD_LIMIT_MB": 300})
    )
    assert equal.memory.hard_limit_mb == 300
