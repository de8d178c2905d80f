"""Run the benchmarks: each scenario under each profile, then tables of medians.

Usage::

    python benchmarks/run.py                 # full mode: the documented figures
    python benchmarks/run.py --quick         # one run each, smaller sizes: a smoke run
    python benchmarks/run.py --scenario dead-host --scenario flaky --repeat 5

``make bench BENCH_ARGS=--quick`` runs it with the project's virtualenv. Every
crawl runs in its own process against a new fault site on loopback. The profiles
of a scenario run in turn, in a rotated order on each repetition, so slow drift of
the machine's load spreads over all of them. Raw metrics of every run go to
``results.json`` in the work folder, written after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "example_project")]

import psutil  # noqa: E402
from faultsite.testing import SiteStartError  # noqa: E402

from benchmarks.harness import run_once  # noqa: E402
from benchmarks.profiles import BASELINE, DEFAULT_PROFILES, PROFILE_SETTINGS  # noqa: E402
from benchmarks.report import render_runs, render_table  # noqa: E402
from benchmarks.scenarios import SCENARIOS, Scenario  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark stock Scrapy against scrapy-resilience on the fault site.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one run per scenario and profile, with smaller sizes (a smoke run)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: every scenario not pending, "
        "and a pending one runs only when named)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=sorted(PROFILE_SETTINGS),
        help=f"run only this profile (repeatable; default: {', '.join(DEFAULT_PROFILES)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per scenario and profile (default: 1 with --quick, else the "
        "scenario's own count, listed by --list)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for logs and results.json (default: a new folder under the temp dir)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the scenarios and profiles, then exit"
    )
    return parser


def machine_info() -> dict[str, Any]:
    """Return what the figures depend on: CPU, cores, memory, load and versions."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        "scrapy": version("scrapy"),
        "twisted": version("twisted"),
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "commit": source_revision(),
    }


def source_revision() -> str | None:
    """Return the checkout's commit, with ``+changes`` when tracked files differ from it.

    Returns None outside a git checkout or without git. Reads only, never changes
    the repository.
    """
    try:
        commit = _git_output("rev-parse", "--short", "HEAD")
        changes = _git_output("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changes else "")


def _git_output(*args: str) -> str:
    """Run a git command in the repository and return its stripped output."""
    completed = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return completed.stdout.strip()


def repeats_for(scenario: Scenario, args: argparse.Namespace) -> int:
    if args.repeat is not None:
        return max(1, int(args.repeat))
    return 1 if args.quick else scenario.full_repeat


def rotated(profiles: list[str], turn: int) -> list[str]:
    """Return ``profiles`` rotated left by ``turn`` places."""
    shift = turn % len(profiles)
    return profiles[shift:] + profiles[:shift]


def list_choices() -> None:
    print("Scenarios:")
    for scenario in SCENARIOS.values():
        note = f" [pending: {scenario.pending}]" if scenario.pending else ""
        runs = f"{scenario.full_repeat} run(s) per profile in full mode"
        print(f"  {scenario.name}: {scenario.summary}; {runs}{note}")
    print("Profiles:")
    for name, settings in PROFILE_SETTINGS.items():
        default = " (default)" if name in DEFAULT_PROFILES else ""
        print(f"  {name}{default}: {settings or 'Scrapy defaults'}")


def summarize(metrics: dict[str, Any]) -> str:
    """Return a one-line summary of one run for the progress output."""
    wall = metrics.get("wall_s")
    pages = metrics.get("pages")
    parts = [
        f"wall {wall:.1f} s" if wall is not None else "no record",
        f"pages {pages}/{metrics['pages_available']}" if pages is not None else "",
        (
            f"lost {metrics['lost']}"
            if metrics.get("lost") is not None
            else f"unfinished at the time limit {metrics.get('unfinished')}"
        ),
        f"exit {metrics['returncode']}",
    ]
    if metrics.get("timed_out"):
        parts.append("TIMED OUT")
    return ", ".join(part for part in parts if part)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        list_choices()
        return 0

    names = args.scenario or [name for name, scenario in SCENARIOS.items() if not scenario.pending]
    profiles = args.profile or list(DEFAULT_PROFILES)
    if BASELINE not in profiles:
        print(f"note: no ratios, because the baseline profile {BASELINE!r} is not run")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scrapy-resilience-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "benchmarks/run.py", *sys.argv[1:]]),
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "profiles": profiles,
        "runs": [],
    }
    print(f"work folder: {workdir}")
    print(f"machine: {json.dumps(results['machine'])}")
    began = time.monotonic()
    tables = []

    for name in names:
        scenario = SCENARIOS[name]
        if scenario.pending:
            # Named on the command line: run it, since its figures are provisional.
            print(f"\n{name}: provisional, {scenario.pending}")
        runs = run_scenario(scenario, profiles, args, workdir, results)
        table = render_table(scenario, runs, profiles)
        tables.append((scenario, runs, table))
        print(f"\n{name}: {scenario.summary}\n{table}")

    results["machine"]["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    save(results, workdir)

    print(f"\nAll tables ({results['mode']} mode, {results['elapsed_s']:.0f} s):")
    for scenario, runs, table in tables:
        print(f"\n{scenario.name}: {scenario.summary}")
        print(render_runs(scenario, runs, profiles))
        print(table)
    print(f"\nraw results: {workdir / 'results.json'}")
    return 0


def run_scenario(
    scenario: Scenario,
    profiles: list[str],
    args: argparse.Namespace,
    workdir: Path,
    results: dict[str, Any],
) -> list[dict[str, Any]]:
    """Run every profile of ``scenario`` in turn, repeatedly; return the runs."""
    repeats = repeats_for(scenario, args)
    runs: list[dict[str, Any]] = []
    for turn in range(repeats):
        for profile in rotated(profiles, turn):
            label = f"{scenario.name} {turn + 1}/{repeats} {profile}"
            print(f"{label}: running", flush=True)
            run_dir = workdir / scenario.name / f"{turn + 1}-{profile}"
            try:
                metrics = run_once(scenario, profile, args.quick, run_dir)
            except (SiteStartError, OSError, ValueError) as error:
                # One broken run must not end a 40-minute benchmark: keep going,
                # and let the table count it as failed.
                print(f"{label}: failed: {error!r} (logs in {run_dir})", flush=True)
                metrics = {"scenario": scenario.name, "profile": profile, "error": repr(error)}
            metrics["repetition"] = turn + 1
            runs.append(metrics)
            results["runs"].append(metrics)
            save(results, workdir)
            if "error" not in metrics:
                print(f"{label}: {summarize(metrics)}", flush=True)
    return runs


def save(results: dict[str, Any], workdir: Path) -> None:
    path = workdir / "results.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1), encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    sys.exit(main())
