"""Real crawls checked through the health monitor's output: the status line every
interval, the JSON report field by field, and the table of the worst domains."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultsite.testing import RunningSite

from tests.conftest import CrawlResult

pytestmark = pytest.mark.e2e

PAGES = 40
OK, DEAD, FLAKY = "127.0.0.2", "127.0.0.4", "127.0.0.6"

STATUS_LINE = re.compile(
    r"\[scrapy_resilience\.extensions\.health\] INFO: Resilience: "
    r"(?P<open>\d+) circuits open(?: \((?P<open_domains>[^)]*)\))?, "
    r"(?P<half_open>\d+) half-open(?: \((?P<half_open_domains>[^)]*)\))?, "
    r"(?P<given_up>\d+) domains given up; "
    r"(?P<held>\d+) requests held \((?P<retries>\d+) retries\); "
    r"delay (?P<delay>[^;]+); memory (?P<memory>[^;]+); "
    r"concurrency (?P<concurrency>\d+) of (?P<max_concurrency>\d+)$"
)


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def sent_urls(result: CrawlResult, address: str) -> list[str]:
    return [entry["url"] for entry in result.record["sent"] if host_of(entry["url"]) == address]


def errbacks_of(result: CrawlResult, address: str) -> list[dict[str, Any]]:
    return [entry for entry in result.errbacks() if host_of(entry["url"]) == address]


@pytest.fixture
def health_crawl(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> tuple[RunningSite, CrawlResult, dict[str, Any]]:
    """Crawl a healthy, a dead and a flaky host with a short status interval."""
    running = site(
        [
            {"name": "ok", "address": OK, "profile": "healthy", "latency": 0.1},
            {"name": "dead", "address": DEAD, "profile": "dead"},
            {"name": "flaky", "address": FLAKY, "profile": "flaky", "rate": 0.3},
        ],
        pages=PAGES,
        seed=7,
    )
    start = [running.url(name, "index.html") for name in ("ok", "dead", "flaky")]
    start += [running.url("dead", f"page{index}.html") for index in range(5)]
    settings = {
        "RESILIENCE_HEALTH_INTERVAL": 0.5,
        "RESILIENCE_REPORT_FILE": str(tmp_path / "reports" / "%(name)s-%(time)s.json"),
        "RESILIENCE_RETRY_TIMES_BY_CATEGORY": {"server": 2},
    }
    result = crawl(start, settings)
    reports = list((tmp_path / "reports").glob("probe-*.json"))
    assert len(reports) == 1, reports
    return running, result, json.loads(reports[0].read_text())


def test_report_fields_per_domain(
    health_crawl: tuple[RunningSite, CrawlResult, dict[str, Any]],
) -> None:
    running, result, report = health_crawl
    assert result.stats["finish_reason"] == "finished"
    domains = report["domains"]
    assert set(domains) == {OK, DEAD, FLAKY}
    assert report["healthy_domains_omitted"] == {"domains": 0, "attempts": 0}
    assert report["domains_evicted"] == 0
    assert "resilience/registry/evicted" not in result.stats

    # The dead host: a few refused attempts, an open circuit, then given up.
    dead = domains[DEAD]
    dead_sent = sent_urls(result, DEAD)
    dead_errbacks = errbacks_of(result, DEAD)
    assert dead["state"] == "open"
    assert dead["given_up"] is True
    assert dead["give_up_reason"].startswith("never answered")
    assert dead["attempts"] == len(dead_sent)
    assert dead["successes"] == 0
    assert dead["responses"] == 0
    assert dead["failures"] == {"network": len(dead_sent)}
    assert dead["retries"] == len(dead_sent) - len(set(dead_sent))
    assert dead["circuit_opened"] == 1
    # Open 3 s (RESILIENCE_CIRCUIT_OPEN_SECONDS in BASE_SETTINGS) before its probe.
    assert dead["open_seconds"] >= 3.0
    assert dead["rejected"] == len(dead_errbacks)
    assert dead["requests_given_up"] == {"circuit_open": len(dead_errbacks)}
    assert {entry["exception"] for entry in dead_errbacks} == {"CircuitOpenError"}

    # The healthy host: a response to every attempt, nothing retried or given up.
    ok = domains[OK]
    ok_arrivals = running.requests("ok")
    assert ok["state"] == "closed"
    assert ok["given_up"] is False
    assert ok["attempts"] == len(ok_arrivals)
    assert ok["responses"] == len(ok_arrivals)
    assert ok["failures"] == {}
    assert ok["retries"] == 0
    assert ok["open_seconds"] == 0.0
    assert ok["requests_given_up"] == {}

    # The flaky host: 503s retried; pages that failed every try given up.
    flaky = domains[FLAKY]
    arrivals = running.requests("flaky")
    paths = Counter(entry["path"] for entry in arrivals)
    server_errbacks = [e for e in errbacks_of(result, FLAKY) if e["category"] == "server"]
    assert flaky["attempts"] == len(arrivals)
    assert flaky["responses"] == len(arrivals)
    assert flaky["failures"] == {"server": sum(1 for e in arrivals if e["status"] == 503)}
    assert flaky["retries"] == len(arrivals) - len(paths)
    assert flaky["circuit_opened"] == 0
    expected_given_up = {"server": len(server_errbacks)} if server_errbacks else {}
    assert flaky["requests_given_up"] == expected_given_up


def test_status_line_every_interval(
    health_crawl: tuple[RunningSite, CrawlResult, dict[str, Any]],
) -> None:
    _, result, _ = health_crawl
    lines = [STATUS_LINE.search(line) for line in result.log.splitlines()]
    matches = [match.groupdict() for match in lines if match is not None]
    assert len(matches) >= 3
    unmatched = [
        line
        for line in result.log.splitlines()
        if "INFO: Resilience: " in line and "circuits" in line
    ]
    assert len(unmatched) == len(matches)

    for fields in matches:
        assert int(fields["concurrency"]) == 16
        assert int(fields["max_concurrency"]) == 16
        assert re.fullmatch(r"\d+ of 512 MB", fields["memory"])
        assert fields["delay"] == "none"
        assert int(fields["retries"]) <= int(fields["held"])
        assert int(fields["open"]) + int(fields["half_open"]) + int(fields["given_up"]) <= 1

    open_lines = [fields for fields in matches if fields["open"] == "1"]
    assert open_lines, "no status line showed the dead host's open circuit"
    assert {fields["open_domains"] for fields in open_lines} == {DEAD}
    # Requests for the dead host wait in the hold while its circuit is open.
    assert max(int(fields["held"]) for fields in open_lines) >= 1


def test_close_table_lists_worst_first(
    health_crawl: tuple[RunningSite, CrawlResult, dict[str, Any]],
) -> None:
    _, result, _ = health_crawl
    log_lines = result.log.splitlines()
    heading = [i for i, line in enumerate(log_lines) if "domains had failures; the worst" in line]
    assert len(heading) == 1
    assert log_lines[heading[0]].endswith("Resilience: 2 of 3 domains had failures; the worst 2:")
    header, first, second = log_lines[heading[0] + 1 : heading[0] + 4]
    assert header.split()[:3] == ["domain", "state", "attempts"]
    assert first.startswith(DEAD)
    assert "given up" in first
    assert "requests: circuit_open" in first
    assert second.startswith(FLAKY)


def test_report_counts_evicted_domains(
    site: Callable[..., RunningSite], crawl: Callable[..., CrawlResult], tmp_path: Path
) -> None:
    names = ["one", "two", "three", "four"]
    running = site(
        [
            {"name": name, "address": f"127.0.0.{index}", "profile": "healthy"}
            for index, name in enumerate(names, start=2)
        ],
        pages=5,
    )
    report_file = tmp_path / "report.json"
    settings = {
        # One request at a time, so each host is idle when the next one starts.
        "CONCURRENT_REQUESTS": 1,
        "RESILIENCE_REGISTRY_MAX_DOMAINS": 1,
        "RESILIENCE_REPORT_FILE": str(report_file),
    }
    result = crawl([running.url(name, "index.html") for name in names], settings, follow=False)

    assert len(result.record["callbacks"]) == len(names)
    report = json.loads(report_file.read_text())
    evicted = report["domains_evicted"]
    assert evicted >= 1
    assert result.stats["resilience/registry/evicted"] == evicted
    # Each host is in the report or was evicted (a host evicted twice counts twice).
    assert set(report["domains"]) <= {f"127.0.0.{index}" for index in range(2, 6)}
    assert len(report["domains"]) + evicted >= len(names)
