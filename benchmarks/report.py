"""Tables of medians, ratios against stock Scrapy, and the bundle's targets.

Each scenario gets one table with a row per metric. Each profile's column shows the
median over its runs, with the ratio to the baseline profile on some rows, and the
last column shows the target with its verdict on the ``bundle`` column. Targets are only
reported, and nothing fails on them. The tables are reStructuredText simple tables, so
they can be pasted into ``docs/benchmarks.rst`` as printed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.metrics import dead_attempt_limit, tail_budget
from benchmarks.profiles import BASELINE, COMMON_SETTINGS
from benchmarks.scenarios import Scenario

#: The profile whose medians are checked against the targets.
TARGET_PROFILE = "bundle"

Medians = dict[str, Any]
Check = Callable[[Medians, Medians], bool | None]


@dataclass(frozen=True)
class Target:
    """A target for the bundle: its text, the scenarios it applies to, and its check.

    ``check(bundle, stock)`` receives the medians of both profiles and returns
    None when a figure is missing.
    """

    text: str
    scenarios: frozenset[str]
    check: Check | None = None


@dataclass(frozen=True)
class Row:
    """One metric: its key in the run metrics, label, decimals, ratio and targets."""

    key: str
    label: str
    digits: int = 1
    ratio: bool = False
    targets: tuple[Target, ...] = ()

    def target_for(self, scenario: str) -> Target | None:
        return next((target for target in self.targets if scenario in target.scenarios), None)


def _every_page(bundle: Medians, stock: Medians) -> bool | None:
    if bundle.get("pages") is None:
        return None
    return bool(bundle["pages"] >= bundle["pages_available"])


def _at_most(key: str, limit: float | Callable[[Medians], float | None]) -> Check:
    def check(bundle: Medians, stock: Medians) -> bool | None:
        value = bundle.get(key)
        bound = limit(bundle) if callable(limit) else limit
        if value is None or bound is None:
            return None
        return bool(value <= bound)

    return check


def _at_least(key: str, limit: float) -> Check:
    def check(bundle: Medians, stock: Medians) -> bool | None:
        value = bundle.get(key)
        return None if value is None else bool(value >= limit)

    return check


def _throughput_ratio(bundle: Medians, stock: Medians) -> bool | None:
    if not bundle.get("throughput_pps") or not stock.get("throughput_pps"):
        return None
    return bool(bundle["throughput_pps"] / stock["throughput_pps"] >= 0.97)


FAULT_SCENARIOS = frozenset({"dead-host", "mixed"})

ROWS = (
    Row("wall_s", "wall time (s)", ratio=True),
    Row("last_item_s", "time of the last item (s)"),
    Row(
        "pages",
        "pages scraped",
        digits=0,
        ratio=True,
        targets=(Target("every page", FAULT_SCENARIOS | {"rate-limit"}, _every_page),),
    ),
    Row("pages_available", "pages on reachable hosts", digits=0),
    Row(
        "throughput_pps",
        "pages per second",
        ratio=True,
        targets=(Target(">= 0.97 x stock", frozenset({"healthy-overhead"}), _throughput_ratio),),
    ),
    Row("faulty_requests", "requests to faulty hosts", digits=0, ratio=True),
    Row(
        "max_dead_attempts",
        "most requests to a dead or blackhole host",
        digits=0,
        targets=(
            Target(
                f"<= {dead_attempt_limit()} (threshold + probes)",
                FAULT_SCENARIOS,
                _at_most("max_dead_attempts", dead_attempt_limit()),
            ),
        ),
    ),
    Row(
        "tail_s",
        "end after last item and first opening (s)",
        targets=(
            Target(
                f"<= {tail_budget(COMMON_SETTINGS['DOWNLOAD_TIMEOUT']):.0f} s "
                "(open x 1.1 + timeout + 10 s)",
                FAULT_SCENARIOS,
                _at_most("tail_s", lambda medians: medians.get("tail_budget_s")),
            ),
        ),
    ),
    Row("rejections", "429 and 503 responses", digits=0),
    Row("min_gap_after_rejection_s", "smallest gap after a 429 or 503 (s)", digits=3),
    Row("inside_retry_after", "requests inside a Retry-After window", digits=0),
    # The target is on the client's clock: a request already sent when the
    # rejection reached the client arrives inside the window however the
    # client behaves.
    Row(
        "sent_inside_retry_after",
        "requests sent inside a window (client clock)",
        digits=0,
        targets=(Target("0", frozenset({"rate-limit"}), _at_most("sent_inside_retry_after", 0)),),
    ),
    Row(
        "settled_rate_ratio",
        "settled rate / allowed rate",
        digits=2,
        targets=(
            Target(">= 0.80", frozenset({"rate-limit"}), _at_least("settled_rate_ratio", 0.8)),
        ),
    ),
    Row(
        "settled_rejected_share",
        "share of 429 and 503 once settled",
        digits=3,
        targets=(
            Target("<= 0.05", frozenset({"rate-limit"}), _at_most("settled_rejected_share", 0.05)),
        ),
    ),
    Row("lost", "requests lost", digits=0),
    Row("unfinished", "requests unfinished at the time limit", digits=0),
    Row("duplicated", "requests with two fates", digits=0),
    Row("peak_rss_mb", "peak memory, crawl process tree (MiB)", digits=0, ratio=True),
    Row("cpu_us_per_request", "crawl CPU per request (us)", digits=0, ratio=True),
    Row(
        "bundle_cpu_us_per_request",
        "bundle CPU per request (us)",
        digits=0,
        targets=(Target("stated", frozenset({"scale"})),),
    ),
    Row(
        "registry_bytes_per_domain",
        "registry bytes per domain (deep size)",
        digits=0,
        targets=(
            Target(
                "<= about 1 KB",
                frozenset({"scale"}),
                _at_most("registry_bytes_per_domain", 1024),
            ),
        ),
    ),
    Row("registry_traced_bytes_per_domain", "registry bytes per domain (traced)", digits=0),
    Row("max_throttle_delay_s", "largest throttle delay at close (s)", digits=2),
)


def medians(runs: list[dict[str, Any]]) -> Medians:
    """Return the median of every numeric metric over ``runs``, ignoring None."""
    keys = {key for run in runs for key, value in run.items() if _is_number(value)}
    result: Medians = {}
    for key in keys:
        values = [run[key] for run in runs if _is_number(run.get(key))]
        result[key] = statistics.median(values) if values else None
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _cell(row: Row, profile: str, by_profile: dict[str, Medians]) -> str:
    value = by_profile[profile].get(row.key)
    text = _format(value, row.digits)
    baseline = by_profile.get(BASELINE, {}).get(row.key)
    if row.ratio and profile != BASELINE and value is not None and baseline:
        text += f" ({value / baseline:.2f}x)"
    return text


def _target_cell(row: Row, scenario: str, by_profile: dict[str, Medians]) -> str:
    target = row.target_for(scenario)
    if target is None:
        return ""
    if target.check is None or TARGET_PROFILE not in by_profile:
        return target.text
    verdict = target.check(by_profile[TARGET_PROFILE], by_profile.get(BASELINE, {}))
    if verdict is None:
        return target.text
    return f"{target.text}: {'met' if verdict else 'missed'}"


def render_table(scenario: Scenario, runs: list[dict[str, Any]], profiles: list[str]) -> str:
    """Return the table of ``scenario`` over ``runs`` for ``profiles``, as RST."""
    by_profile = {
        profile: medians([run for run in runs if run["profile"] == profile]) for profile in profiles
    }
    header = ["metric", *profiles, "target"]
    lines = [header]
    for row in ROWS:
        values = [by_profile[profile].get(row.key) for profile in profiles]
        if all(value is None for value in values):
            continue
        cells = [_cell(row, profile, by_profile) for profile in profiles]
        lines.append([row.label, *cells, _target_cell(row, scenario.name, by_profile)])
    return _simple_table(lines)


def _simple_table(lines: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    border = "  ".join("=" * width for width in widths)

    def format_line(line: list[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        return "  ".join(cells).rstrip()

    body = [format_line(line) for line in lines[1:]]
    return "\n".join([border, format_line(lines[0]), border, *body, border])


def render_runs(scenario: Scenario, runs: list[dict[str, Any]], profiles: list[str]) -> str:
    """Return a line per profile with how many runs it had and how they ended."""
    parts = []
    for profile in profiles:
        mine = [run for run in runs if run["profile"] == profile]
        failed = [
            run for run in mine if run.get("error") or run.get("returncode") or run.get("timed_out")
        ]
        reasons = sorted({str(run.get("finish_reason")) for run in mine if "error" not in run})
        text = f"{profile}: {len(mine)} run(s), finish reason {', '.join(reasons)}"
        if failed:
            text += f", {len(failed)} failed or timed out"
        parts.append(text)
    return "; ".join(parts)
