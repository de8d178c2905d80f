"""Real crawls with the adaptive throttle against the fault site: a host that
responds with fast 429s, a host whose latency rises and falls, floors and the maximum
delay, rate-limit headers, and requests that opt out of pacing.

Gaps and overlaps are measured on the site's clock from its request log,
never as wall-clock speed, with margins for a loaded 2-core machine.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultsite import reachable_pages
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = pytest.mark.e2e

ROBOTS = "/robots.txt"


def log_of(running: RunningSite, host: str, *, pages_only: bool = True) -> list[dict[str, Any]]:
    """Return a host's request log records in arrival order, robots.txt left out."""
    records = running.requests(host)
    if pages_only:
        records = [record for record in records if record["path"] != ROBOTS]
    return sorted(records, key=lambda record: record["arrival"])


def gaps(records: list[dict[str, Any]]) -> list[float]:
    return [b["arrival"] - a["arrival"] for a, b in itertools.pairwise(records)]


def overlaps(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Return the pairs of consecutive requests where the second arrived before
    the site finished responding to the first, so both were in flight at once."""
    return [
        (a["path"], b["path"])
        for a, b in itertools.pairwise(records)
        if b["arrival"] < a["answered"]
    ]


def max_concurrent(records: list[dict[str, Any]]) -> int:
    events = sorted(
        [(record["arrival"], 1) for record in records]
        + [(record["answered"], -1) for record in records]
    )
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def page_urls(running: RunningSite, host: str, paths: list[str]) -> list[str]:
    return [running.url(host, path) for path in paths]


def read_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_fast_429s_slow_to_allowed_pace(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    rate, retry_after, pages = 10.0, 1, 150
    interval = 1 / rate
    running = site(
        [
            {
                "name": "limited",
                "address": "127.0.0.7",
                "profile": "rate_limited",
                "rate": rate,
                "burst": 5,
                "retry_after": retry_after,
                # 429s count against the bucket.
                "penalize_rejected": True,
            },
            {"name": "ok", "address": "127.0.0.2", "profile": "healthy", "latency": [0.02, 0.1]},
        ],
        pages=pages,
    )
    report_file = tmp_path / "report.json"
    result = crawl(
        [running.url("limited", "index.html"), running.url("ok", "index.html")],
        {"RESILIENCE_REPORT_FILE": str(report_file), "RESILIENCE_THROTTLE_DEBUG": True},
    )

    expected = reachable_pages("generated", pages=pages)
    assert result.stats["finish_reason"] == "finished"
    assert result.paths_by_host("127.0.0.7") == expected
    assert result.paths_by_host("127.0.0.2") == expected

    limited = log_of(running, "limited")
    rejected = [record for record in limited if record["status"] == 429]
    # The first burst at full concurrency, then a few while the pace settles.
    assert 1 <= len(rejected) <= 16

    # Steady state: the second half of the crawl, after the pace settled, and
    # before the last pages, when links run out. Responses to missing pages (404)
    # take tokens too.
    steady = limited[len(limited) // 2 : len(limited) * 9 // 10]
    span = steady[-1]["arrival"] - steady[0]["arrival"]
    steady_rejected = [record for record in steady if record["status"] == 429]
    answered = len(steady) - len(steady_rejected)
    assert answered / span >= 0.8 * rate
    assert len(steady_rejected) <= 0.05 * len(steady)
    # Tokens stored during a Retry-After pause, and probing until the next 429,
    # allow gaps a little under the interval.
    steady_gaps = gaps(steady)
    assert statistics.median(steady_gaps) >= 0.9 * interval
    assert min(steady_gaps) >= 0.7 * interval

    # Once paced, one request at a time, and none inside a Retry-After window.
    paced = [record for record in limited if record["arrival"] > rejected[0]["answered"] + 1.0]
    assert overlaps(paced) == []
    for throttled in [record for record in paced if record["status"] == 429]:
        window = (throttled["answered"], throttled["answered"] + retry_after - 0.05)
        inside = [record for record in paced if window[0] < record["arrival"] < window[1]]
        assert inside == []

    # The healthy host beside it kept its concurrency and finished long before.
    healthy = log_of(running, "ok")
    assert max_concurrent(healthy) >= 4
    healthy_span = healthy[-1]["arrival"] - healthy[0]["arrival"]
    assert healthy_span < (limited[-1]["arrival"] - limited[0]["arrival"]) / 3

    assert result.stats["resilience/throttle/raised"] >= 1
    assert 1.0 <= result.stats["resilience/throttle/max_delay"] <= 10.0
    assert "Throttle delay of 127.0.0.7: 0.000s -> 1.000s (throttled; latency" in result.log

    domains = read_report(report_file)["domains"]
    assert domains["127.0.0.7"]["latency_p50"] <= domains["127.0.0.7"]["latency_p95"]
    assert 0.5 * interval <= domains["127.0.0.7"]["delay"] <= 2 * interval
    assert domains["127.0.0.2"]["delay"] == 0.0
    assert 0.02 <= domains["127.0.0.2"]["latency_p50"] <= 1.0


def test_rising_latency_lengthens_delay_then_recovers(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    # Requests 21 to 40 take 0.3 s; the others are fast.
    slow_from, slow_until, slow_latency = 20, 40, 0.3
    running = site(
        [
            {
                "name": "slowing",
                "address": "127.0.0.3",
                "profile": "healthy",
                "latency": 0.005,
                "latency_schedule": [[0, 0.005], [slow_from, slow_latency], [slow_until, 0.005]],
            }
        ],
        pages=70,
    )
    report_file = tmp_path / "report.json"
    # Target concurrency 0.5: the delay is twice the median latency.
    settings = {
        "RESILIENCE_THROTTLE_TARGET_CONCURRENCY": 0.5,
        "RESILIENCE_REPORT_FILE": str(report_file),
        "RESILIENCE_THROTTLE_DEBUG": True,
    }
    result = crawl([running.url("slowing", "index.html")], settings)

    assert result.stats["finish_reason"] == "finished"
    records = log_of(running, "slowing")
    assert len(records) >= 60
    durations = [record["answered"] - record["arrival"] for record in records]
    assert min(durations[slow_from:slow_until]) >= slow_latency

    # Before the rise: full concurrency, no delay.
    assert max_concurrent(records[:slow_from]) >= 2

    # Once the median latency rose: one request at a time, 2 x 0.3 s apart.
    # The first slow responses reach the median while later requests are already
    # in flight, so the check starts a little after the rise.
    delayed = records[slow_from + 14 : slow_until]
    assert overlaps(delayed) == []
    assert min(gaps(delayed)) >= 0.95 * 2 * slow_latency

    # After the fall: released, full concurrency again.
    recovered = records[slow_until + 10 :]
    assert len(recovered) >= 10
    assert max_concurrent(recovered) >= 2
    assert statistics.median(gaps(recovered)) < 0.1

    assert result.stats["resilience/throttle/max_delay"] >= 0.95 * 2 * slow_latency
    assert "(released;" in result.log
    assert read_report(report_file)["domains"]["127.0.0.3"]["delay"] == 0.0


def test_delays_stay_between_floor_and_maximum(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    running = site(
        [
            {"name": "fast", "address": "127.0.0.2", "profile": "healthy", "latency": 0.005},
            {"name": "slow", "address": "127.0.0.3", "profile": "healthy", "latency": 0.4},
            {
                "name": "polite",
                "address": "127.0.0.4",
                "profile": "healthy",
                "latency": 0.005,
                "robots_txt": "User-agent: *\nCrawl-delay: 0.5\n",
            },
            {
                "name": "greedy",
                "address": "127.0.0.5",
                "profile": "healthy",
                "latency": 0.005,
                "robots_txt": "User-agent: *\nCrawl-delay: 30\n",
            },
        ],
        pages=20,
    )
    paths = sorted(reachable_pages("generated", pages=20))
    start = (
        page_urls(running, "fast", paths[:10])
        + page_urls(running, "slow", paths[:6])
        + page_urls(running, "polite", paths[:8])
        + page_urls(running, "greedy", paths[:5])
    )
    report_file = tmp_path / "report.json"
    settings = {
        "DOWNLOAD_DELAY": 0.25,
        "ROBOTSTXT_OBEY": True,
        "RESILIENCE_THROTTLE_MAX_DELAY": 1.0,
        # 0.4 s of latency makes a 4 s latency delay, above the maximum.
        "RESILIENCE_THROTTLE_TARGET_CONCURRENCY": 0.1,
        "RESILIENCE_REPORT_FILE": str(report_file),
    }
    result = crawl(start, settings, follow=False)

    assert result.stats["finish_reason"] == "finished"
    assert len(result.record["callbacks"]) == len(start)

    # DOWNLOAD_DELAY stays a floor for a fast host the throttle does not pace.
    assert min(gaps(log_of(running, "fast"))) >= 0.9 * 0.25
    # The latency rule sets 4 s, and the delay stops at the 1 s maximum. The
    # first gap follows the first response, before any latency was measured.
    slow_gaps = gaps(log_of(running, "slow"))[1:]
    assert min(slow_gaps) >= 0.9 * 1.0
    assert max(slow_gaps) < 2.5
    # Crawl-delay raises the floor, up to the maximum delay.
    assert min(gaps(log_of(running, "polite"))) >= 0.9 * 0.5
    greedy_gaps = gaps(log_of(running, "greedy"))
    assert min(greedy_gaps) >= 0.9 * 1.0
    assert max(greedy_gaps) < 2.5
    assert result.stats["resilience/throttle/crawl_delay"] == 2
    assert result.stats["resilience/throttle/max_delay"] == 1.0

    domains = read_report(report_file)["domains"]
    delays = {key: domains[key]["delay"] for key in domains}
    assert delays == {"127.0.0.2": 0.25, "127.0.0.3": 1.0, "127.0.0.4": 0.5, "127.0.0.5": 1.0}


def test_rate_limit_headers_pace_before_429(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    rate, pages = 4.0, 40
    running = site(
        [
            {
                "name": "announced",
                "address": "127.0.0.6",
                "profile": "rate_limited",
                "rate": rate,
                "burst": 4,
                "retry_after": 2,
                "ratelimit_headers": True,
            }
        ],
        pages=pages,
    )
    result = crawl([running.url("announced", "index.html")])

    assert result.paths_by_host("127.0.0.6") == reachable_pages("generated", pages=pages)
    records = log_of(running, "announced")
    # The first response announces 3 requests left, before any 429.
    assert [record["status"] for record in records].count(429) == 0
    assert overlaps(records[1:]) == []
    assert statistics.median(gaps(records)) >= 0.95 / rate
    assert result.stats["resilience/throttle/paced"] == 1
    assert "resilience/throttle/raised" not in result.stats


def test_dont_throttle_requests_skip_pacing(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site(
        [{"name": "paced", "address": "127.0.0.2", "profile": "healthy", "latency": 0.005}],
        pages=20,
    )
    paths = sorted(reachable_pages("generated", pages=20))
    urgent = [
        {"url": url, "meta": {"resilience_dont_throttle": True}}
        for url in page_urls(running, "paced", paths[:4])
    ]
    normal = page_urls(running, "paced", paths[4:7])
    settings = {"DOWNLOAD_SLOTS": {"127.0.0.2": {"delay": 1.0}}}
    result = crawl([*normal, *urgent], settings, follow=False)

    assert len(result.record["callbacks"]) == 7
    records = log_of(running, "paced")
    urgent_paths = set(paths[:4])
    urgent_arrivals = [record["arrival"] for record in records if record["path"] in urgent_paths]
    normal_records = [record for record in records if record["path"] not in urgent_paths]
    assert len(urgent_arrivals) == 4
    # The opted-out requests went at once, beside the paced ones.
    assert max(urgent_arrivals) - min(urgent_arrivals) < 0.5
    # The others kept the 1 s floor between them.
    assert min(gaps(normal_records)) >= 0.9 * 1.0
