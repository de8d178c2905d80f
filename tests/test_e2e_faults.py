"""Real crawls with Scrapy's engine against the fault site: dead, hanging,
flaky and rate-limiting hosts.

Assertions are about structure (which pages, how many attempts, gaps measured
on one monotonic clock), never about wall-clock speed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultsite import flaky_fails, reachable_pages
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = pytest.mark.e2e

PAGES = 40
THRESHOLD = 5
PROBES = 1
EXPECTED = reachable_pages("generated", pages=PAGES)


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def sent_to(result: CrawlResult, address: str) -> list[dict[str, Any]]:
    return [entry for entry in result.record["sent"] if host_of(entry["url"]) == address]


def first_event(result: CrawlResult, signal: str, domain: str) -> float:
    times = [
        e["time"]
        for e in result.record["events"]
        if e["signal"] == signal and e.get("domain") == domain
    ]
    assert times, f"no {signal} for {domain}"
    return min(times)


def test_dead_host_given_up_healthy_complete(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site(
        [
            {"name": "ok1", "address": "127.0.0.2", "profile": "healthy", "latency": 0.01},
            {"name": "ok2", "address": "127.0.0.3", "profile": "healthy", "latency": 0.01},
            {"name": "dead", "address": "127.0.0.4", "profile": "dead"},
        ],
        pages=PAGES,
    )
    result = crawl([running.url(name, "index.html") for name in ("ok1", "ok2", "dead")])

    assert result.stats.get("finish_reason") == "finished"
    assert result.paths_by_host("127.0.0.2") == EXPECTED
    assert result.paths_by_host("127.0.0.3") == EXPECTED
    assert len(sent_to(result, "127.0.0.4")) <= THRESHOLD + PROBES

    dead_errbacks = [e for e in result.errbacks() if host_of(e["url"]) == "127.0.0.4"]
    assert dead_errbacks
    assert {e["exception"] for e in dead_errbacks} == {"CircuitOpenError"}
    assert result.stats["resilience/circuit/given_up"] == 1
    assert result.stats["resilience/circuit/rejected"] >= len(dead_errbacks)

    last_healthy = max(e["time"] for e in result.record["callbacks"])
    opened = first_event(result, "circuit_opened", "127.0.0.4")
    budget = 3 * 1.1 + 5 + 10  # open time x 1.1 + DOWNLOAD_TIMEOUT + 10 s
    assert result.record["finished"] - max(last_healthy, opened) <= budget


def test_blackhole_bounded_in_flight(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site(
        [
            {"name": "ok", "address": "127.0.0.2", "profile": "healthy", "latency": 0.3},
            {"name": "hole", "address": "127.0.0.5", "profile": "blackhole"},
        ],
        pages=PAGES,
    )
    hole = running.url("hole")
    start = [running.url("ok", "index.html")] + [f"{hole}page{index}.html" for index in range(12)]
    result = crawl(start, {"DOWNLOAD_TIMEOUT": 3})

    assert result.paths_by_host("127.0.0.2") == EXPECTED
    assert result.record["max_in_flight"]["127.0.0.5"] <= THRESHOLD
    hole_arrivals = running.requests("hole")
    assert len(hole_arrivals) <= THRESHOLD + PROBES

    first_hang = min(entry["arrival"] for entry in hole_arrivals)
    healthy_during_hang = [
        entry for entry in running.requests("ok") if first_hang < entry["arrival"] < first_hang + 3
    ]
    assert healthy_during_hang, "healthy requests stopped while the blackhole attempts hung"

    hole_errbacks = [e for e in result.errbacks() if host_of(e["url"]) == "127.0.0.5"]
    assert len(hole_errbacks) == 12
    assert {e["exception"] for e in hole_errbacks} == {"CircuitOpenError"}


def flaky_expectation(
    seed: int, host: str, rate: float, attempts: int
) -> tuple[set[str], set[str], set[str]]:
    """Return (scraped, failed, missing) paths a crawl of the flaky host must give.

    The index is retried until it succeeds (the circuit decides while the host
    has never answered); every other page gets ``attempts`` tries. Links of a
    failed page are never seen, so the walk follows successful pages only.
    """
    from example_project.spiders.docs import build_link_extractor, is_same_origin
    from faultsite.content import SiteContent
    from scrapy.http import HtmlResponse

    content = SiteContent.from_root("generated", pages=PAGES, js_pages=1)
    extractor = build_link_extractor()
    origin = "http://flaky.test"

    def links(path: str) -> list[str]:
        page = content.lookup(path)
        response = HtmlResponse(origin + path, body=page.body, encoding="utf-8")  # type: ignore[union-attr]
        found = []
        for link in extractor.extract_links(response):
            if is_same_origin(link.url, response.url):
                found.append(urlsplit(link.url).path)
        return found

    scraped, failed, missing = {"/index.html"}, set(), set()
    queue = list(links("/index.html"))
    seen = set(queue) | {"/index.html"}
    while queue:
        path = queue.pop()
        if all(flaky_fails(seed, host, path, attempt, rate) for attempt in range(1, attempts + 1)):
            failed.add(path)
            continue
        if content.lookup(path) is None:
            missing.add(path)
            continue
        scraped.add(path)
        for target in links(path):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return scraped, failed, missing


def test_flaky_host_scraped_within_limits(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    seed, rate = 7, 0.4
    running = site(
        [{"name": "flaky", "address": "127.0.0.6", "profile": "flaky", "rate": rate}],
        pages=PAGES,
        seed=seed,
    )
    result = crawl(
        [running.url("flaky", "index.html")], {"RESILIENCE_RETRY_TIMES_BY_CATEGORY": {"server": 2}}
    )

    scraped, failed, missing = flaky_expectation(seed, "flaky", rate, attempts=3)
    assert failed, "the seed must make some pages fail every attempt"
    assert result.stats.get("resilience/circuit/opened", 0) == 0
    assert result.paths_by_host("127.0.0.6") == scraped

    errback_paths = Counter(urlsplit(e["url"]).path for e in result.errbacks())
    assert set(errback_paths) == failed | missing
    assert set(errback_paths.values()) == {1}
    assert {e["exception"] for e in result.errbacks()} == {"HttpError"}
    categories = {urlsplit(e["url"]).path: e["category"] for e in result.errbacks()}
    assert {categories[path] for path in failed} == {"server"}
    assert {categories[path] for path in missing} <= {None}


def test_retry_after_pause_respected(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site(
        [
            {
                "name": "limited",
                "address": "127.0.0.7",
                "profile": "rate_limited",
                "rate": 5,
                "burst": 5,
                "retry_after": 3,
            }
        ],
        pages=PAGES,
    )
    result = crawl([running.url("limited", "index.html")])

    assert result.paths_by_host("127.0.0.7") == EXPECTED
    rejections = [entry["time"] for entry in result.record["received"] if entry["status"] == 429]
    assert rejections, "the rate limit was never hit"
    sent = sorted(entry["time"] for entry in result.record["sent"])
    for received in rejections:
        # The pause starts when the client receives the 429: nothing may be
        # sent to the host for the next 3 seconds.
        late = [round(when - received, 3) for when in sent if received < when < received + 3]
        assert not late, f"requests sent {late}s after a 429 with Retry-After: 3"

    arrivals = sorted(entry["arrival"] for entry in running.requests("limited"))
    first_rejection = min(rejections)
    in_flight_then = sum(1 for when in sent if when < first_rejection) - sum(
        1 for entry in result.record["received"] if entry["time"] <= first_rejection
    )
    inside = [when for when in arrivals if first_rejection < when < first_rejection + 3]
    assert len(inside) <= max(0, in_flight_then)


def test_invalid_setting_stops_crawl(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site([{"name": "ok", "address": "127.0.0.2", "profile": "healthy"}], pages=5)
    result = crawl([running.url("ok")], {"RESILIENCE_RETRY_JITTER": "random"})

    # Scrapy 2.13 logs the start-up error and exits 0; later versions exit 1.
    assert "Invalid value for RESILIENCE_RETRY_JITTER: 'random'" in result.log
    assert "Spider opened" not in result.log
    assert running.requests() == []


def test_autothrottle_conflict_stops_crawl(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    running = site([{"name": "ok", "address": "127.0.0.2", "profile": "healthy"}], pages=5)
    result = crawl([running.url("ok")], {"AUTOTHROTTLE_ENABLED": True})

    assert "RESILIENCE_THROTTLE_ENABLED = False" in result.log
    assert "Spider opened" not in result.log
    assert running.requests() == []


def test_recovering_host_crawled_after_probe(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Any
) -> None:
    recovered = tmp_path / "recovered"
    running = site(
        [
            {
                "name": "back",
                "address": "127.0.0.9",
                "profile": "recovering",
                "fail_until_file": str(recovered),
            }
        ],
        pages=PAGES,
    )
    result = crawl([running.url("back", "index.html")], touch_on_open=str(recovered))

    assert result.paths_by_host("127.0.0.9") == EXPECTED
    events = [e["signal"] for e in result.record["events"] if e.get("domain") == "127.0.0.9"]
    assert events == ["circuit_opened", "circuit_half_opened", "circuit_closed"]
    probe_time = first_event(result, "circuit_half_opened", "127.0.0.9")
    first_success = min(e["time"] for e in result.record["callbacks"])
    assert first_success > probe_time
    # Only the site's links to missing pages fail, with 404.
    assert {(e["exception"], e["category"]) for e in result.errbacks()} == {("HttpError", None)}
    assert all("/missing/" in e["url"] for e in result.errbacks())


def test_redirect_after_retry_reaches_callback_once(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    # With seed 12, /moved.html fails its first attempt and redirects on its second.
    running = site(
        [
            {
                "name": "flaky",
                "address": "127.0.0.6",
                "profile": "flaky",
                "rate": 0.5,
                "redirects": {"/moved.html": "/index.html"},
            }
        ],
        pages=PAGES,
        seed=12,
    )
    start = [running.url("flaky", "moved.html"), running.url("flaky", "index.html")]
    result = crawl(start, follow=False)

    moved = [entry for entry in running.requests("flaky") if entry["path"] == "/moved.html"]
    assert [entry["status"] for entry in moved] == [503, 301]
    assert result.callback_urls() == Counter({running.url("flaky", "index.html"): 1})
    assert result.stats["retry/count"] >= 1
