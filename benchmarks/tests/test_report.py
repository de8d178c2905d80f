"""Medians, ratios against stock and target verdicts in the printed tables."""

from __future__ import annotations

from typing import Any

from benchmarks.report import medians, render_runs, render_table
from benchmarks.scenarios import SCENARIOS

PROFILES = ["stock", "stock-autothrottle", "bundle"]


def run(profile: str, **metrics: Any) -> dict[str, Any]:
    return {"profile": profile, "pages_available": 600, **metrics}


def row_of(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(label))


def test_medians_skip_missing_values() -> None:
    runs: list[dict[str, Any]] = [
        {"wall_s": 3.0},
        {"wall_s": None},
        {"wall_s": 1.0},
        {"wall_s": 2.0, "note": "x"},
    ]

    assert medians(runs) == {"wall_s": 2.0}


def test_ratio_against_stock() -> None:
    runs = [
        run("stock", wall_s=60.0, pages=500),
        run("stock-autothrottle", wall_s=90.0, pages=500),
        run("bundle", wall_s=30.0, pages=600),
    ]
    table = render_table(SCENARIOS["dead-host"], runs, PROFILES)

    assert "90.0 (1.50x)" in row_of(table, "wall time (s)")
    assert "30.0 (0.50x)" in row_of(table, "wall time (s)")
    assert "600 (1.20x)" in row_of(table, "pages scraped")


def test_target_verdicts_on_bundle() -> None:
    runs = [
        run("stock", pages=500, max_dead_attempts=90),
        run("stock-autothrottle", pages=500, max_dead_attempts=80),
        run("bundle", pages=600, max_dead_attempts=6),
        run("bundle", pages=590, max_dead_attempts=8),
        run("bundle", pages=600, max_dead_attempts=7),
    ]
    table = render_table(SCENARIOS["dead-host"], runs, PROFILES)

    assert row_of(table, "pages scraped").endswith("every page: met")
    assert row_of(table, "most requests to a dead").endswith("(threshold + probes): missed")


def test_target_only_in_its_scenario() -> None:
    runs = [run(profile, pages=600) for profile in PROFILES]
    table = render_table(SCENARIOS["flaky"], runs, PROFILES)

    assert "every page" not in table


def test_rows_without_values_hidden() -> None:
    runs = [run(profile, wall_s=1.0) for profile in PROFILES]
    table = render_table(SCENARIOS["flaky"], runs, PROFILES)

    assert "registry bytes" not in table
    assert "wall time (s)" in table


def test_table_is_simple_rst() -> None:
    runs = [run(profile, wall_s=1.0) for profile in PROFILES]
    lines = render_table(SCENARIOS["flaky"], runs, PROFILES).splitlines()

    borders = [line for line in lines if set(line) <= {"=", " "}]
    assert len(borders) == 3
    assert lines[0] == lines[2] == lines[-1]


def test_failed_runs_counted() -> None:
    runs = [
        run("stock", wall_s=1.0, returncode=0, finish_reason="finished"),
        {"profile": "bundle", "error": "OSError('no site')"},
        run("bundle", wall_s=2.0, returncode=0, finish_reason="finished"),
    ]
    text = render_runs(SCENARIOS["flaky"], runs, ["stock", "bundle"])
    table = render_table(SCENARIOS["flaky"], runs, ["stock", "bundle"])

    assert "stock: 1 run(s), finish reason finished;" in text
    assert text.endswith("bundle: 2 run(s), finish reason finished, 1 failed or timed out")
    assert "2.0 (2.00x)" in row_of(table, "wall time (s)")
