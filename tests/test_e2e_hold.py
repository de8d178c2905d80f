"""Real crawls that exercise the request hold: shutdown with held requests,
the in-flight bounds, and retries made in callbacks."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultsite import reachable_pages
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = pytest.mark.e2e

PAGES = 40
EXPECTED = reachable_pages("generated", pages=PAGES)
THRESHOLD = 5


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def limited_host(port: int, retry_after: int = 6) -> list[dict[str, object]]:
    return [
        {
            "name": "limited",
            "address": "127.0.0.8",
            "port": port,
            "profile": "rate_limited",
            "rate": 5,
            "burst": 5,
            "retry_after": retry_after,
        }
    ]


@pytest.mark.slow
def test_held_requests_resume_with_jobdir(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    port = free_port("127.0.0.8")
    jobdir = str(tmp_path / "job")
    settings = {"JOBDIR": jobdir, "CLOSESPIDER_TIMEOUT": 3}

    first_site = site(limited_host(port), pages=PAGES)
    first = crawl([first_site.url("limited", "index.html")], settings)
    first_site.stop()
    assert first.stats["finish_reason"] == "closespider_timeout"
    assert first.stats["resilience/hold/persisted"] > 0

    second_site = site(limited_host(port), pages=PAGES)
    second = crawl([second_site.url("limited", "index.html")], {"JOBDIR": jobdir})
    assert second.stats["finish_reason"] == "finished"
    assert second.stats["resilience/hold/restored"] == first.stats["resilience/hold/persisted"]

    pages = Counter(urlsplit(url).path for url in first.callback_urls().elements())
    pages.update(urlsplit(url).path for url in second.callback_urls().elements())
    assert set(pages) == EXPECTED
    assert set(pages.values()) == {1}, {path: n for path, n in pages.items() if n != 1}


def test_held_requests_reported_without_jobdir(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    running = site(limited_host(free_port("127.0.0.8")), pages=PAGES)
    report_file = tmp_path / "report.json"
    result = crawl(
        [running.url("limited", "index.html")],
        {"CLOSESPIDER_TIMEOUT": 3, "RESILIENCE_REPORT_FILE": str(report_file)},
    )

    unfinished = result.stats["resilience/hold/unfinished"]
    assert unfinished > 0
    assert f"closed with {unfinished} held requests unfinished" in result.log
    report = json.loads(report_file.read_text())
    assert len(report["unfinished"]) == unfinished
    assert report["domains"]["127.0.0.8"]["held_at_close"] == unfinished
    assert {item["domain"] for item in report["unfinished"]} == {"127.0.0.8"}


def test_hanging_new_hosts_never_fill_concurrency(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    holes = [f"127.0.0.{n}" for n in range(10, 14)]
    hosts = [{"name": "ok", "address": "127.0.0.2", "profile": "healthy", "latency": 0.2}]
    hosts += [
        {"name": f"hole{i}", "address": address, "profile": "blackhole"}
        for i, address in enumerate(holes)
    ]
    running = site(hosts, pages=PAGES)

    start = [running.url("ok", "index.html")]
    for index in range(4):
        start += [running.url(f"hole{index}", f"page{n}.html") for n in range(10)]
    settings = {"CONCURRENT_REQUESTS_PER_DOMAIN": 16, "ROBOTSTXT_OBEY": True, "DOWNLOAD_TIMEOUT": 3}
    result = crawl(start, settings, group=holes)

    assert result.paths_by_host("127.0.0.2") == EXPECTED
    for address in holes:
        assert result.record["max_in_flight"].get(address, 0) <= THRESHOLD
    assert result.record["max_group_in_flight"] <= 16 // 2
    first_hang = min(
        entry["arrival"] for index in range(4) for entry in running.requests(f"hole{index}")
    )
    healthy = [
        entry for entry in running.requests("ok") if first_hang < entry["arrival"] < first_hang + 3
    ]
    assert healthy, "healthy requests stopped while the new hosts hung"
    hole_errbacks = [e for e in result.errbacks() if urlsplit(e["url"]).hostname in holes]
    assert len(hole_errbacks) == 40
    assert {e["exception"] for e in hole_errbacks} == {"CircuitOpenError"}


def test_callback_retry_waits_in_hold(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site([{"name": "ok", "address": "127.0.0.2", "profile": "healthy"}], pages=PAGES)
    result = crawl(
        [running.url("ok", "index.html")],
        {"RESILIENCE_RETRY_BACKOFF_BASE": 1.0},
        retry_in_callback="/page-1.html",
    )

    assert result.paths_by_host("127.0.0.2") == EXPECTED
    retried = [entry for entry in result.record["callback_retries"]]
    assert len(retried) == 1
    path = urlsplit(retried[0]["url"]).path
    arrivals = sorted(entry["arrival"] for entry in running.requests("ok") if entry["path"] == path)
    assert len(arrivals) == 2
    # Equal jitter on a 1 s backoff waits between 0.5 and 1 s.
    assert arrivals[1] - retried[0]["time"] >= 0.5
    assert result.stats["resilience/retry/delayed"] >= 1
    assert result.stats["retry/count"] == 1


def test_hold_spills_to_disk_and_loses_nothing(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site(limited_host(free_port("127.0.0.8"), retry_after=2), pages=PAGES)
    result = crawl(
        [running.url("limited", "index.html")],
        {"RESILIENCE_HOLD_MAX_REQUESTS": 2, "CONCURRENT_REQUESTS_PER_DOMAIN": 16},
    )

    assert result.stats["resilience/hold/spilled"] > 0
    assert result.stats["resilience/hold/max_size"] > 2
    pages = Counter(urlsplit(url).path for url in result.callback_urls().elements())
    assert set(pages) == EXPECTED
    assert set(pages.values()) == {1}
