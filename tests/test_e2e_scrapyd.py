"""The example project deployed to a real Scrapyd on loopback, and crawls run as jobs.

One Scrapyd serves the module: it is started with this interpreter in a temporary
folder, on a free port of 127.0.0.1, and the example project is deployed to it
with ``scrapyd-deploy``. A "finished" status in ``listjobs.json`` proves nothing
(a job that fails to import a middleware is listed the same way), so every check
reads the job's log, items and report.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import scrapy
from faultsite import reachable_pages
from faultsite.testing import RunningSite

from scrapy_resilience.report import scrapyd_job_id
from tests.conftest import EXAMPLE_PROJECT
from tests.scrapydservice import POLL_SECONDS, Job, Scrapyd, dumped_stats, log_records

PROJECT = "example_project"
SPIDER = "docs"
PAGES = 40
EXPECTED = reachable_pages("generated", pages=PAGES)

#: Bound of one job, in seconds. The longest, the resumed job, took about 20 s
#: on a 2-core machine.
JOB_TIMEOUT = 60.0

#: Settings of every job: short circuit and backoff times so a job through
#: faults stays well under a minute.
JOB_SETTINGS = {
    "RESILIENCE_CIRCUIT_OPEN_SECONDS": 3,
    "RESILIENCE_RETRY_BACKOFF_BASE": 0.2,
    "DOWNLOAD_TIMEOUT": 5,
}

#: A status line of the health monitor. Group 1 is the count of held requests.
HELD_IN_STATUS = re.compile(r"Resilience: .* (\d+) requests held ")


@pytest.fixture(scope="module")
def scrapyd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapyd]:
    """Start a Scrapyd for the module and deploy the example project to it."""
    # `make test` installs the [scrapyd] extra. A tox environment without it
    # skips these tests, and `pytest -ra` lists the reason.
    reason = "needs the [scrapyd] extra: pip install -e '.[scrapyd]'"
    pytest.importorskip("scrapyd", reason=reason)
    pytest.importorskip("scrapyd_client", reason=reason)
    workdir = tmp_path_factory.mktemp("scrapyd")
    service = Scrapyd(workdir / "service")
    service.start()
    try:
        service.deploy(EXAMPLE_PROJECT, workdir)
        yield service
    finally:
        service.stop()


def error_records(log: str) -> list[tuple[str, str]]:
    """Return ``(logger, first message line)`` of every ERROR and CRITICAL record."""
    records = log_records(log, levels=("ERROR", "CRITICAL"))
    return [(record.logger, record.message.splitlines()[0]) for record in records]


def paths_by_host(items: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Count the items of each host by URL path."""
    counts: dict[str, Counter[str]] = {}
    for item in items:
        counts.setdefault(item["host"], Counter())[urlsplit(item["url"]).path] += 1
    return counts


def assert_process_finished(service: Scrapyd, job: str) -> None:
    """Check that Scrapyd's own log shows the job's process ending with status 0."""
    output = service.output()
    assert f"Process finished: project={PROJECT!r} spider={SPIDER!r} job={job!r}" in output
    assert f"job={job!r}" not in "\n".join(
        line for line in output.splitlines() if "Process died" in line
    )


def report_of(directory: Path, job: str) -> dict[str, Any]:
    path = directory / f"report-{job}.json"
    assert path.exists(), sorted(item.name for item in directory.iterdir())
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return report


def summary(name: str, job: Job, pages: int) -> None:
    # Printed for the record of a run (pytest -s shows it).
    print(f"{name}: job {job.id}, {job.duration:.1f} s, {pages} pages")


@pytest.mark.e2e
@pytest.mark.slow
def test_job_crawls_fault_site(
    scrapyd: Scrapyd, site: Callable[..., RunningSite], tmp_path: Path
) -> None:
    hosts = [
        {"name": "web", "profile": "healthy"},
        {"name": "flaky", "profile": "flaky", "rate": 0.3},
        {"name": "dead", "profile": "dead"},
    ]
    running = site(hosts, pages=PAGES)
    dead = urlsplit(running.url("dead"))
    settings = {**JOB_SETTINGS, "RESILIENCE_REPORT_FILE": str(tmp_path / "report-%(job)s.json")}
    ready = str(running.log_path.parent / "ready.json")

    job_id = scrapyd.schedule(PROJECT, SPIDER, settings, site=ready)
    job = scrapyd.wait_for_job(PROJECT, job_id, JOB_TIMEOUT)
    log = scrapyd.job_log(PROJECT, SPIDER, job_id)
    items = scrapyd.job_items(PROJECT, SPIDER, job_id)
    summary("full job", job, len(items))

    assert_process_finished(scrapyd, job_id)
    # The example project obeys robots.txt, so the dead host fails first on its
    # robots.txt: the retry gives that up and RobotsTxtMiddleware logs it for
    # the start page. Then the circuit breaker gives the host up. Nothing else
    # may be logged at ERROR.
    expected_errors = [
        (
            "scrapy_resilience.downloadermiddlewares.retry",
            f"Gave up retrying <GET http://{dead.netloc}/robots.txt> ",
        ),
        (
            "scrapy.downloadermiddlewares.robotstxt",
            f"Error downloading <GET http://{dead.netloc}/index.html>: ",
        ),
        ("scrapy_resilience.runtime", f"Giving up on {dead.hostname}: "),
    ]
    errors = error_records(log)
    for logger, prefix in expected_errors:
        matching = [error for error in errors if error[0] == logger and error[1].startswith(prefix)]
        assert len(matching) == 1, (prefix, errors)
    assert len(errors) == len(expected_errors), errors

    stats = dumped_stats(log)
    assert stats["finish_reason"] == "finished"
    assert stats["resilience/circuit/given_up"] == 1
    assert stats["resilience/failures/server"] > 0
    assert stats["resilience/retry/delayed"] > 0
    assert stats["resilience/attempts"] > 2 * len(EXPECTED)
    assert stats["item_scraped_count"] == len(items)
    assert "domains had failures; the worst" in log

    pages = paths_by_host(items)
    reachable = {urlsplit(running.url(name)).hostname for name in ("web", "flaky")}
    assert set(pages) == reachable
    for host, counts in pages.items():
        assert set(counts) == EXPECTED, host
        assert set(counts.values()) == {1}, host

    report = report_of(tmp_path, job_id)
    assert report["spider"] == SPIDER
    assert report["finish_reason"] == "finished"
    assert report["domains"][dead.hostname]["given_up"] is True
    assert report["stats"]["resilience/circuit/given_up"] == 1


@pytest.mark.e2e
@pytest.mark.slow
def test_cancelled_job_resumes_from_jobdir(
    scrapyd: Scrapyd, site: Callable[..., RunningSite], tmp_path: Path
) -> None:
    # Five pages per second at most, then 429 with a 2 s Retry-After: the crawl
    # takes several pauses, and while the host is paused its requests are held.
    host = {"name": "limited", "address": "127.0.0.8", "profile": "rate_limited"}
    running = site([{**host, "rate": 5, "burst": 5, "retry_after": 2}], pages=PAGES)
    settings = {
        **JOB_SETTINGS,
        "JOBDIR": str(tmp_path / "jobdir"),
        "RESILIENCE_REPORT_FILE": str(tmp_path / "report-%(job)s.json"),
        "RESILIENCE_HEALTH_INTERVAL": 0.5,
    }
    start = running.url("limited", "index.html")

    first_id = scrapyd.schedule(PROJECT, SPIDER, settings, urls=start)
    wait_until_held(scrapyd, running, first_id)
    scrapyd.cancel(PROJECT, first_id)
    first = scrapyd.wait_for_job(PROJECT, first_id, JOB_TIMEOUT)
    first_log = scrapyd.job_log(PROJECT, SPIDER, first_id)
    first_items = scrapyd.job_items(PROJECT, SPIDER, first_id)
    summary("cancelled job", first, len(first_items))

    assert_process_finished(scrapyd, first_id)
    assert "Received SIGINT, shutting down gracefully" in first_log
    assert error_records(first_log) == []
    first_stats = dumped_stats(first_log)
    assert first_stats["finish_reason"] == "shutdown"
    persisted = first_stats["resilience/hold/persisted"]
    assert persisted > 0
    assert f"Saved {persisted} held requests to {settings['JOBDIR']}" in first_log
    assert 0 < len(first_items) < len(EXPECTED)
    assert report_of(tmp_path, first_id)["finish_reason"] == "shutdown"

    second_id = scrapyd.schedule(PROJECT, SPIDER, settings, urls=start)
    second = scrapyd.wait_for_job(PROJECT, second_id, JOB_TIMEOUT)
    second_log = scrapyd.job_log(PROJECT, SPIDER, second_id)
    second_items = scrapyd.job_items(PROJECT, SPIDER, second_id)
    summary("resumed job", second, len(second_items))

    assert_process_finished(scrapyd, second_id)
    assert error_records(second_log) == []
    second_stats = dumped_stats(second_log)
    assert second_stats["finish_reason"] == "finished"
    assert second_stats["resilience/hold/restored"] == persisted
    assert report_of(tmp_path, second_id)["finish_reason"] == "finished"

    pages = Counter(urlsplit(item["url"]).path for item in first_items + second_items)
    assert set(pages) == EXPECTED
    assert set(pages.values()) == {1}, {path: count for path, count in pages.items() if count > 1}


@pytest.mark.e2e
@pytest.mark.slow
def test_cancelled_job_reports_held_without_jobdir(
    scrapyd: Scrapyd, site: Callable[..., RunningSite], tmp_path: Path
) -> None:
    host = {"name": "limited", "address": "127.0.0.8", "profile": "rate_limited"}
    running = site([{**host, "rate": 5, "burst": 5, "retry_after": 2}], pages=PAGES)
    settings = {
        **JOB_SETTINGS,
        "RESILIENCE_REPORT_FILE": str(tmp_path / "report-%(job)s.json"),
        "RESILIENCE_HEALTH_INTERVAL": 0.5,
    }

    job_id = scrapyd.schedule(PROJECT, SPIDER, settings, urls=running.url("limited", "index.html"))
    wait_until_held(scrapyd, running, job_id)
    scrapyd.cancel(PROJECT, job_id)
    job = scrapyd.wait_for_job(PROJECT, job_id, JOB_TIMEOUT)
    log = scrapyd.job_log(PROJECT, SPIDER, job_id)
    items = scrapyd.job_items(PROJECT, SPIDER, job_id)
    summary("cancelled job without JOBDIR", job, len(items))

    assert_process_finished(scrapyd, job_id)
    assert error_records(log) == []
    stats = dumped_stats(log)
    assert stats["finish_reason"] == "shutdown"
    unfinished = stats["resilience/hold/unfinished"]
    assert unfinished > 0
    assert f"The crawl closed with {unfinished} held requests unfinished" in log

    report = report_of(tmp_path, job_id)
    assert len(report["unfinished"]) == unfinished
    assert report["domains"]["127.0.0.8"]["held_at_close"] == unfinished


@pytest.mark.e2e
@pytest.mark.slow
def test_invalid_setting_listed_as_finished(scrapyd: Scrapyd) -> None:
    # Scrapyd lists a job that failed at start-up as finished, with no status:
    # only the job log and Scrapyd's own log show the failure.
    settings = {"RESILIENCE_CIRCUIT_OPEN_SECONDS": -1}
    job_id = scrapyd.schedule(PROJECT, SPIDER, settings, urls="http://127.0.0.2:9/index.html")
    scrapyd.wait_for_job(PROJECT, job_id, JOB_TIMEOUT)
    log = scrapyd.job_log(PROJECT, SPIDER, job_id)

    died = [line for line in scrapyd.output().splitlines() if f"job={job_id!r}" in line]
    assert any("Process died: exitstatus=1" in line for line in died), died
    assert "InvalidSettingError" in log
    assert "RESILIENCE_CIRCUIT_OPEN_SECONDS" in log
    assert dumped_stats(log) == {}


def wait_until_held(
    service: Scrapyd, running: RunningSite, job: str, timeout: float = 30.0
) -> None:
    """Wait until the job has pages and a health status line with held requests.

    The fault site's log shows pages served; the job log, at the health
    monitor's interval, shows the requests held while the host is paused.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_SECONDS) + 1):
        served = [record for record in running.requests("limited") if record["status"] == 200]
        held_counts = [
            int(match[1])
            for match in HELD_IN_STATUS.finditer(service.job_log(PROJECT, SPIDER, job))
        ]
        if len(served) > 1 and held_counts and held_counts[-1] > 0:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_SECONDS)
    pytest.fail(f"job {job} held no requests within {timeout} s")


def test_job_id_from_scrapyd_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRAPY_JOB", "from-environment")
    spider = scrapy.Spider(name="docs", _job="0123abcd")
    assert scrapyd_job_id(spider) == "0123abcd"


def test_job_id_from_older_scrapyd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRAPY_JOB", "from-environment")
    assert scrapyd_job_id(scrapy.Spider(name="docs")) == "from-environment"


def test_job_id_outside_scrapyd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCRAPY_JOB", raising=False)
    assert scrapyd_job_id(scrapy.Spider(name="docs")) is None
