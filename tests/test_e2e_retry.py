"""Real crawls of the backoff retry: content checks, bypassing the circuit,
and the bundle with its circuit breaker switched off."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from faultsite import fault_hits, flaky_fails, generated_path
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = pytest.mark.e2e

PAGES = 40
PATHS = [generated_path(n) for n in range(1, 25)]
INTERNAL_KEYS = {"_resilience", "_resilience_retries"}


def min_gaps(arrivals: list[dict[str, object]]) -> list[float]:
    """Return, for each path requested more than once, the gaps between its arrivals."""
    by_path: dict[str, list[float]] = {}
    for entry in arrivals:
        by_path.setdefault(str(entry["path"]), []).append(float(entry["arrival"]))  # type: ignore[arg-type]
    gaps = []
    for times in by_path.values():
        times.sort()
        gaps += [later - earlier for earlier, later in itertools.pairwise(times)]
    return gaps


def test_content_check_retries_ban_pages(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    seed, rate = 3, 0.5
    running = site(
        [{"name": "ban", "address": "127.0.0.14", "profile": "ban", "rate": rate}],
        pages=PAGES,
        seed=seed,
    )
    paths = PATHS
    start = [running.url("ban", path.lstrip("/")) for path in paths]
    result = crawl(
        start, {"RESILIENCE_RETRY_CONTENT_CHECK": "tests.crawlrunner.not_banned"}, follow=False
    )

    def rejected(path: str) -> bool:
        return all(
            fault_hits("ban", seed, "ban", path, attempt, rate=rate) for attempt in (1, 2, 3)
        )

    expected_failed = {path for path in paths if rejected(path)}
    assert expected_failed, "the seed must ban some pages on every attempt"
    assert result.paths_by_host("127.0.0.14") == set(paths) - expected_failed
    failed = {urlsplit(e["url"]).path: e for e in result.errbacks()}
    assert set(failed) == expected_failed
    assert {e["exception"] for e in failed.values()} == {"ContentRejectedError"}
    assert {e["category"] for e in failed.values()} == {"content"}
    assert result.stats["resilience/retry/gave_up/content"] == len(expected_failed)


def test_dont_circuit_retries_still_wait(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    seed, rate = 7, 0.5
    running = site(
        [{"name": "flaky", "address": "127.0.0.6", "profile": "flaky", "rate": rate}],
        pages=PAGES,
        seed=seed,
    )
    start = [
        {"url": running.url("flaky", path.lstrip("/")), "meta": {"resilience_dont_circuit": True}}
        for path in PATHS
    ]
    result = crawl(start, {"RESILIENCE_RETRY_BACKOFF_BASE": 1.0}, follow=False)

    assert any(flaky_fails(seed, "flaky", path, 1, rate) for path in PATHS)
    gaps = min_gaps(running.requests("flaky"))
    assert gaps, "no page was retried"
    # Equal jitter on a 1 s backoff waits at least 0.5 s before a retry.
    assert min(gaps) >= 0.5
    assert result.stats["resilience/retry/delayed"] == len(gaps)


def test_circuit_off_keeps_retry_and_clean_meta(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult]
) -> None:
    seed, rate = 7, 0.5
    running = site(
        [{"name": "flaky", "address": "127.0.0.6", "profile": "flaky", "rate": rate}],
        pages=PAGES,
        seed=seed,
    )
    result = crawl(
        [running.url("flaky", "index.html")],
        {"RESILIENCE_CIRCUIT_ENABLED": False, "RESILIENCE_RETRY_BACKOFF_BASE": 1.0},
    )

    assert result.stats.get("resilience/circuit/opened", 0) == 0
    assert result.record["callbacks"]
    for callback in result.record["callbacks"]:
        assert not INTERNAL_KEYS & set(callback["meta_keys"]), callback
    gaps = min_gaps(running.requests("flaky"))
    assert gaps
    assert min(gaps) >= 0.5
