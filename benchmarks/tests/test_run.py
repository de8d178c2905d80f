"""The runner: profile order, repetitions, and a failed run that does not stop it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run
from benchmarks.scenarios import SCENARIOS


def test_rotated_order() -> None:
    profiles = ["stock", "stock-autothrottle", "bundle"]

    assert run.rotated(profiles, 0) == profiles
    assert run.rotated(profiles, 1) == ["stock-autothrottle", "bundle", "stock"]
    assert run.rotated(profiles, 3) == profiles


def test_repeats_per_mode() -> None:
    quick = argparse.Namespace(repeat=None, quick=True)
    full = argparse.Namespace(repeat=None, quick=False)
    forced = argparse.Namespace(repeat=5, quick=True)

    assert run.repeats_for(SCENARIOS["flaky"], quick) == 1
    assert run.repeats_for(SCENARIOS["flaky"], full) == 3
    assert run.repeats_for(SCENARIOS["dead-host"], full) == 2
    assert run.repeats_for(SCENARIOS["scale"], full) == 1
    assert run.repeats_for(SCENARIOS["scale"], forced) == 5


def test_failed_run_recorded_and_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def fake_run_once(scenario: Any, profile: str, quick: bool, workdir: Path) -> dict[str, Any]:
        calls.append((scenario.name, profile))
        if profile == "stock-autothrottle":
            raise OSError("site did not start")
        return {"scenario": scenario.name, "profile": profile, "wall_s": 1.0, "returncode": 0}

    monkeypatch.setattr(run, "run_once", fake_run_once)
    args = argparse.Namespace(repeat=2, quick=True)
    results: dict[str, Any] = {"runs": []}
    profiles = ["stock", "stock-autothrottle", "bundle"]

    runs = run.run_scenario(SCENARIOS["flaky"], profiles, args, tmp_path, results)

    assert len(calls) == 6
    assert calls[3] == ("flaky", "stock-autothrottle")
    assert len(runs) == 6
    errors = [entry for entry in runs if "error" in entry]
    assert len(errors) == 2
    assert all("site did not start" in entry["error"] for entry in errors)
    assert (tmp_path / "results.json").exists()
