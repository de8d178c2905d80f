"""Run the example's main job: crawl a fault site with the example project.

Usage: ``python example_project/run_main_job.py [--out DIR] [--quick]``, from any
folder. The job starts the fault site with eight hosts (three healthy, one each
dead, blackhole, flaky, rate-limited and recovering), crawls every host with the
``docs`` spider in a ``scrapy crawl`` subprocess, stops the site and prints a
summary. It exits with 0 when every reachable host gave every reachable page and
the crawl finished with reason ``finished``, else with 1.

Everything it writes goes under ``--out`` (default ``example_project/output/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

EXAMPLE_PROJECT = Path(__file__).resolve().parent
REPO = EXAMPLE_PROJECT.parent
sys.path.insert(0, str(EXAMPLE_PROJECT))

from faultsite import DOCS_ROOT, GENERATED, reachable_pages  # noqa: E402
from faultsite.testing import SiteStartError, start_site  # noqa: E402

#: Wall-clock bound of the crawl; past it the crawl is stopped and the job fails.
CRAWL_TIMEOUT_SECONDS = 15 * 60
#: How long a crawl stopped with SIGINT gets to write its stats and report.
GRACEFUL_STOP_SECONDS = 60

#: Profiles whose hosts never serve a page, so none of their pages is expected.
UNREACHABLE_PROFILES = ("dead", "blackhole")

QUICK_PAGES = 60


def site_config(quick: bool) -> dict[str, Any]:
    """Return the fault site's config: eight hosts on 127.0.0.2 to 127.0.0.9."""
    root = GENERATED if quick or not DOCS_ROOT.is_dir() else str(DOCS_ROOT)
    pages = QUICK_PAGES if quick else 200
    latency = [0.01, 0.05]
    hosts: list[dict[str, Any]] = [
        {"name": "healthy1", "profile": "healthy", "latency": latency},
        {"name": "healthy2", "profile": "healthy", "latency": latency},
        {"name": "healthy3", "profile": "healthy", "latency": latency},
        {"name": "dead", "profile": "dead"},
        {"name": "blackhole", "profile": "blackhole"},
        {"name": "flaky", "profile": "flaky", "rate": 0.2},
        {
            "name": "rate_limited",
            "profile": "rate_limited",
            "rate": 10,
            "burst": 10,
            "retry_after": 2,
        },
        {
            "name": "recovering",
            "profile": "recovering",
            "fail_mode": "refuse",
            "fail_seconds": 5 if quick else 20,
        },
    ]
    for number, host in enumerate(hosts, start=2):
        host["address"] = f"127.0.0.{number}"
    return {"seed": 1, "root": root, "pages": pages, "hosts": hosts}


@dataclass
class CrawlRun:
    """Outcome of the ``scrapy crawl`` subprocess: exit code, duration and time limit."""

    returncode: int
    seconds: float
    timed_out: bool


def run_crawl(out: Path, ready_path: Path, extra_settings: list[str], timeout: float) -> CrawlRun:
    """Run ``scrapy crawl docs`` on the site and wait for it, at most ``timeout`` seconds.

    On timeout the crawl gets SIGINT (Scrapy's graceful stop, which still writes
    stats and the report), then SIGKILL if it has not ended after
    GRACEFUL_STOP_SECONDS. Only this child process is signalled.
    """
    command = [
        sys.executable, "-m", "scrapy", "crawl", "docs",
        "-a", f"site={ready_path}",
        "-O", str(out / "items.jsonl"),
        "-s", f"RESILIENCE_REPORT_FILE={out / 'report.json'}",
        "-s", f"LOG_FILE={out / 'crawl.log'}",
    ]  # fmt: skip
    for setting in extra_settings:
        command += ["-s", setting]

    # The checkout comes first, so the job runs the add-on being developed here
    # even when another version is installed.
    env = dict(os.environ)
    paths = [str(REPO), str(EXAMPLE_PROJECT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)

    started = time.monotonic()
    with (out / "crawl-stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=EXAMPLE_PROJECT, env=env, stdin=subprocess.DEVNULL, stderr=stderr
        )
        timed_out = False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)
            try:
                process.wait(GRACEFUL_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return CrawlRun(process.returncode, time.monotonic() - started, timed_out)


def read_items(path: Path) -> dict[str, set[str]]:
    """Return the distinct scraped URL paths (with any query) by item host."""
    scraped: dict[str, set[str]] = {}
    if not path.exists():
        return scraped
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        parts = urlsplit(item["url"])
        target = parts.path + ("?" + parts.query if parts.query else "")
        scraped.setdefault(item["host"], set()).add(target)
    return scraped


def read_report(path: Path) -> dict[str, Any] | None:
    """Return the add-on's report, or None when it is missing or not valid JSON."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


_STATS_LINE = re.compile(r"^\s*'(?P<key>[^']+)':\s*(?P<value>-?\d+(?:\.\d+)?|'[^']*'),?\}?$")


def read_log_stats(path: Path) -> dict[str, Any]:
    """Return the numeric and string stats of the stats dump at the end of a crawl log.

    Used when the report file is missing. Values of other types (dates) are skipped.
    """
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    _before, marker, dump = text.rpartition("Dumping Scrapy stats:")
    if not marker:
        return {}

    stats: dict[str, Any] = {}
    for line in dump.splitlines()[1:]:
        match = _STATS_LINE.match(line)
        if match is None:
            if line.startswith("20"):
                # The next log record (it starts with the date): the dump has ended.
                break
            continue
        value = match["value"]
        if value.startswith("'"):
            stats[match["key"]] = value.strip("'")
        else:
            stats[match["key"]] = float(value) if "." in value else int(value)
    return stats


@dataclass
class HostResult:
    """The outcome of one host: expected pages, scraped pages and requests received."""

    name: str
    profile: str
    domain: str
    expected: set[str]
    scraped: set[str]
    requests: Counter[Any]

    @property
    def missing(self) -> set[str]:
        """Expected pages that no item covers."""
        return self.expected - self.scraped


def collect_results(
    ready: dict[str, Any], records: list[dict[str, Any]], scraped_by_host: dict[str, set[str]]
) -> list[HostResult]:
    """Match the scraped items and the site's request log with each host."""
    content = ready["content"]
    reachable = reachable_pages(content["root"], pages=content["pages"])

    results = []
    for name, host in ready["hosts"].items():
        statuses = Counter(record["status"] for record in records if record["host"] == name)
        expected = set() if host["profile"] in UNREACHABLE_PROFILES else reachable
        item_host = host.get("hostname", host["address"])
        scraped = scraped_by_host.get(item_host, set())
        results.append(HostResult(name, host["profile"], item_host, expected, scraped, statuses))
    return results


def format_statuses(statuses: Counter[Any]) -> str:
    """Return counts by status, such as ``200:526 429:31 none:2`` (none: no response)."""
    parts = [
        f"{status if status is not None else 'none'}:{count}" for status, count in statuses.items()
    ]
    return " ".join(sorted(parts)) or "-"


def crawl_end(report: dict[str, Any] | None, log_stats: dict[str, Any]) -> tuple[str, float | None]:
    """Return the crawl's finish reason and its duration in seconds by Scrapy.

    Both come from the report, or from the crawl log's stats when the report lacks
    them. The duration is None when neither has it.
    """
    report = report or {}
    finish_reason = report.get("finish_reason")
    if not isinstance(finish_reason, str):
        finish_reason = str(log_stats.get("finish_reason", "unknown"))

    elapsed = report.get("elapsed_seconds")
    if not isinstance(elapsed, (int, float)):
        elapsed = log_stats.get("elapsed_time_seconds")
    return finish_reason, float(elapsed) if isinstance(elapsed, (int, float)) else None


def summary_lines(
    results: list[HostResult],
    crawl: CrawlRun,
    report: dict[str, Any] | None,
    report_path: Path,
    log_stats: dict[str, Any],
) -> list[str]:
    """Return the printed summary: hosts, the crawl's end, stats and what was given up."""
    lines = [f"{'host':<13} {'profile':<13} {'pages':>11} {'requests':>9}  requests by status"]
    for result in results:
        pages = f"{len(result.scraped)}/{len(result.expected)}"
        total = sum(result.requests.values())
        lines.append(
            f"{result.name:<13} {result.profile:<13} {pages:>11} {total:>9}  "
            f"{format_statuses(result.requests)}"
        )

    lines.append("")
    finish_reason, elapsed = crawl_end(report, log_stats)
    lines.append(
        f"crawl: finish reason {finish_reason!r}, exit code {crawl.returncode}, "
        f"{crawl.seconds:.1f} s wall clock"
        + (f", {elapsed:.1f} s by Scrapy" if elapsed is not None else "")
        + (" (stopped at the time limit)" if crawl.timed_out else "")
    )

    if report is None:
        lines.append(
            f"report: {report_path} is missing or invalid, so the stats below come from "
            "the crawl log. Is the scrapy_resilience add-on enabled?"
        )
        stats = log_stats
    else:
        report_stats = report.get("stats")
        stats = report_stats if isinstance(report_stats, dict) else {}
    lines.extend(_stats_lines(stats))
    if report is not None:
        lines.extend(_given_up_lines(report, {result.domain: result.name for result in results}))
    return lines


def _stats_lines(stats: dict[str, Any]) -> list[str]:
    keys = sorted(key for key in stats if key.startswith(("resilience/", "retry/")))
    if not keys:
        return ["stats: no resilience/* or retry/* stats"]
    lines = ["stats:"]
    lines.extend(f"  {key}: {stats[key]}" for key in keys)
    return lines


def _given_up_lines(report: dict[str, Any], names: dict[str, str]) -> list[str]:
    domains = report.get("domains")
    if not isinstance(domains, dict):
        return ["given up: the report has no 'domains' section"]

    given_up = {
        key: state
        for key, state in domains.items()
        if isinstance(state, dict) and state.get("given_up")
    }
    if not given_up:
        return ["given up: nothing"]
    lines = ["given up:"]
    for key, state in sorted(given_up.items()):
        failures = state.get("failures")
        failures = failures if isinstance(failures, dict) else {}
        failure_text = ", ".join(
            f"{category} {count}" for category, count in sorted(failures.items())
        )
        label = f"{names[key]} ({key})" if key in names else key
        lines.append(
            f"  {label}: {state.get('give_up_reason') or 'no reason given'} "
            f"(state {state.get('state', '?')}, {state.get('attempts', '?')} attempts, "
            f"{state.get('successes', '?')} successes, failures: {failure_text or 'none'})"
        )
    return lines


def verdict_lines(results: list[HostResult], finish_reason: str) -> tuple[bool, list[str]]:
    """Return whether the job succeeded, and the lines saying why not."""
    problems = []
    for result in results:
        missing = sorted(result.missing)
        if missing:
            examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            problems.append(
                f"MISSING: {result.name} ({result.profile}): {len(missing)} of "
                f"{len(result.expected)} reachable pages not scraped, e.g. {examples}"
            )
    if finish_reason != "finished":
        problems.append(f"MISSING: the crawl ended with reason {finish_reason!r}, not 'finished'")
    if not problems:
        return True, ["OK: every reachable page of every reachable host was scraped"]
    return False, problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Crawl the fault site with the example project and check every page."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=EXAMPLE_PROJECT / "output",
        help="folder for everything the job writes (default: example_project/output)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: a generated site of {QUICK_PAGES} pages, recovery after 5 s",
    )
    parser.add_argument(
        "-s",
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra Scrapy setting for the crawl (repeatable), e.g. -s ADDONS={} for stock Scrapy",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=CRAWL_TIMEOUT_SECONDS,
        help=f"stop the crawl after this many seconds (default {CRAWL_TIMEOUT_SECONDS})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the job and return its exit code: 0 when nothing is missing, else 1."""
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("items.jsonl", "report.json", "crawl.log", "summary.txt"):
        # Scrapy appends to LOG_FILE, and a stale report would pass for this run's.
        (out / name).unlink(missing_ok=True)

    try:
        site = start_site(site_config(args.quick), out / "site")
    except SiteStartError as error:
        print(f"error: the fault site did not start: {error}", file=sys.stderr)
        return 1
    print(
        f"fault site ready (pid {site.pid}), content {site.ready['content']['root']}; crawling...",
        flush=True,
    )

    try:
        crawl = run_crawl(out, out / "site" / "ready.json", args.set, args.timeout)
    finally:
        site.stop()

    report_path = out / "report.json"
    report = read_report(report_path)
    log_stats = read_log_stats(out / "crawl.log")
    results = collect_results(site.ready, site.requests(), read_items(out / "items.jsonl"))

    lines = summary_lines(results, crawl, report, report_path, log_stats)
    finish_reason, _elapsed = crawl_end(report, log_stats)
    passed, verdict = verdict_lines(results, finish_reason)
    lines += ["", *verdict, "", f"files: {out}"]

    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
