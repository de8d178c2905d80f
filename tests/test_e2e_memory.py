"""Real crawls under memory pressure: the memory guard against Scrapy's MemoryUsage.

The workloads come from ``tests/crawlrunner.py``: callbacks that hold anonymous
memory maps for a while (memory in use then grows with throughput), and a child
process that holds memory until the guard first lowers concurrency. Assertions
are about structure (pages, order of events, requests in flight after each
change), never about wall-clock speed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultsite import reachable_pages
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The memory limit of every crawl here, in MB. An idle crawl process measures
#: about 60 MB PSS (Scrapy 2.19, Python 3.11), so there is room for a few held pages.
LIMIT = 140
CONCURRENCY = 16
HEAVY_PAGES = 60
PAGES = 250
EXPECTED = reachable_pages("generated", pages=PAGES)

GUARD_SETTINGS: dict[str, Any] = {
    "CONCURRENT_REQUESTS": CONCURRENCY,
    "CONCURRENT_REQUESTS_PER_DOMAIN": CONCURRENCY,
    "RESILIENCE_MEMORY_LIMIT_MB": LIMIT,
    "RESILIENCE_MEMORY_CHECK_INTERVAL": 0.5,
    "RESILIENCE_MEMORY_FULL_SCAN_INTERVAL": 1,
    "RESILIENCE_MEMORY_RESTORE_STEP_SHARE": 0.5,
    # Measure only the guard: Scrapy's MemoryUsage stays off in these crawls.
    "MEMUSAGE_ENABLED": False,
}

#: Stock Scrapy: no add-on, and MemoryUsage at the same limit and interval.
STOCK_SETTINGS: dict[str, Any] = {
    "ADDONS": {},
    "CONCURRENT_REQUESTS": CONCURRENCY,
    "CONCURRENT_REQUESTS_PER_DOMAIN": CONCURRENCY,
    "MEMUSAGE_ENABLED": True,
    "MEMUSAGE_LIMIT_MB": LIMIT,
    "MEMUSAGE_CHECK_INTERVAL_SECONDS": 0.5,
}

#: Each of the first HEAVY_PAGES callbacks keeps 8 MB for 2 s.
HEAVY_WORKLOAD: dict[str, Any] = {
    "hold_megabytes": 8,
    "hold_seconds": 2,
    "hold_pages": HEAVY_PAGES,
    "sample_tree_memory": 0.25,
}

#: Time after a change for requests fetched just before it to reach the downloader.
SETTLE_SECONDS = 1.0


def healthy_site(site: Callable[..., RunningSite], latency: float) -> RunningSite:
    host = {"name": "ok", "address": "127.0.0.2", "profile": "healthy", "latency": latency}
    return site([host], pages=PAGES)


def pressure_events(result: CrawlResult) -> list[dict[str, Any]]:
    return [e for e in result.record["events"] if e["signal"] == "memory_pressure_changed"]


def scraped_paths(result: CrawlResult) -> Counter[str]:
    return Counter(urlsplit(url).path for url in result.callback_urls().elements())


def assert_in_flight_within_each_change(result: CrawlResult, events: list[dict[str, Any]]) -> None:
    """Check that requests sent while a lowered concurrency was in force kept within it."""
    ends = [event["time"] for event in events[1:]] + [float("inf")]
    for event, end in zip(events, ends, strict=True):
        start = event["time"] + SETTLE_SECONDS
        during = [
            entry["total_in_flight"]
            for entry in result.record["sent"]
            if start <= entry["time"] < end
        ]
        if during:
            assert max(during) <= event["new_concurrency"], event


def test_guard_lowers_and_restores_heavy_crawl(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = healthy_site(site, latency=0.25)
    result = crawl([running.url("ok", "index.html")], GUARD_SETTINGS, **HEAVY_WORKLOAD)

    assert result.stats["finish_reason"] == "finished"
    pages = scraped_paths(result)
    assert set(pages) == EXPECTED
    assert set(pages.values()) == {1}

    events = pressure_events(result)
    lowered = [e for e in events if e["new_concurrency"] < e["old_concurrency"]]
    raised = [e for e in events if e["new_concurrency"] > e["old_concurrency"]]
    assert lowered, "the guard never lowered concurrency"
    assert lowered[0]["old_concurrency"] == CONCURRENCY
    assert lowered[0]["memory_mb"] > LIMIT
    assert all(e["limit_mb"] == LIMIT for e in events)
    assert all(e["memory_mb"] > LIMIT for e in lowered)
    assert all(e["memory_mb"] < 0.8 * LIMIT for e in raised)

    # Restored step by step, after the last reduction, back to CONCURRENT_REQUESTS.
    after_last_lowering = [e for e in raised if e["time"] > lowered[-1]["time"]]
    assert len(after_last_lowering) >= 2
    assert events[-1]["new_concurrency"] == CONCURRENCY
    assert max(e["new_concurrency"] for e in events) == CONCURRENCY
    assert_in_flight_within_each_change(result, events)

    stats = result.stats
    assert stats["resilience/memory/limit_mb"] == LIMIT
    assert stats["resilience/memory/reductions"] == len(lowered)
    assert stats["resilience/memory/restorations"] == len(raised)
    assert stats["resilience/memory/min_concurrency"] == min(e["new_concurrency"] for e in events)
    assert stats["resilience/memory/max_mb"] > LIMIT
    assert stats["resilience/memory/full_scans"] <= stats["resilience/memory/checks"]
    elapsed = result.record["finished"] - result.record["started"]
    # The guard's own CPU time per second of crawl, full scans every check
    # near the limit: about 0.01 s/s measured on a 2-core machine.
    assert stats["resilience/memory/cpu_seconds"] / elapsed < 0.05


def test_stock_memusage_closes_heavy_crawl_early(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = healthy_site(site, latency=0.25)
    result = crawl([running.url("ok", "index.html")], STOCK_SETTINGS, **HEAVY_WORKLOAD)

    assert result.stats["finish_reason"] == "memusage_exceeded"
    assert result.stats["memusage/limit_reached"] == 1
    assert len(scraped_paths(result)) < len(EXPECTED)
    assert pressure_events(result) == []


CHILD_WORKLOAD: dict[str, Any] = {"child_megabytes": 200, "sample_tree_memory": 0.25}


def test_guard_counts_child_process_memory(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = healthy_site(site, latency=0.3)
    settings = {
        **GUARD_SETTINGS,
        "RESILIENCE_MEMORY_RESTORE_SAMPLES": 2,
        "RESILIENCE_MEMORY_RESTORE_STEP_SHARE": 1.0,
    }
    result = crawl([running.url("ok", "index.html")], settings, **CHILD_WORKLOAD)

    assert result.stats["finish_reason"] == "finished"
    assert set(scraped_paths(result)) == EXPECTED

    record = result.record
    # The memory is the child's: the crawl process alone never came near the limit.
    assert record["self_max_rss_mb"] < LIMIT
    events = pressure_events(result)
    assert events, "the guard never saw the child's memory"
    first = events[0]
    assert first["new_concurrency"] < first["old_concurrency"]
    assert first["memory_mb"] > LIMIT
    assert record["child_released"] >= first["time"]

    restored = [e for e in events if e["time"] > record["child_released"]]
    assert restored, "concurrency was not restored after the child freed its memory"
    assert restored[-1]["new_concurrency"] == CONCURRENCY
    assert restored[-1]["memory_mb"] < 0.8 * LIMIT
    assert_in_flight_within_each_change(result, events)


def test_stock_memusage_blind_to_child_process(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = healthy_site(site, latency=0.3)
    result = crawl([running.url("ok", "index.html")], STOCK_SETTINGS, **CHILD_WORKLOAD)

    # MemoryUsage reads the peak RSS of the Scrapy process alone, so the
    # process tree went over the limit and nothing happened.
    assert result.stats["finish_reason"] == "finished"
    assert "memusage/limit_reached" not in result.stats
    assert result.record["tree_memory_peak_mb"] > LIMIT


def test_hard_limit_closes_spider_once(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = healthy_site(site, latency=0.3)
    settings = {**GUARD_SETTINGS, "RESILIENCE_MEMORY_HARD_LIMIT_MB": LIMIT + 20}
    workload = {**CHILD_WORKLOAD, "child_keep": True}
    result = crawl([running.url("ok", "index.html")], settings, **workload)

    assert result.stats["finish_reason"] == "resilience_memory_hard_limit"
    assert len(scraped_paths(result)) < len(EXPECTED)
    assert result.log.count("closing the spider (resilience_memory_hard_limit)") == 1
    assert f"is above the hard limit of {LIMIT + 20} MB" in result.log
