"""Run one crawl of one scenario under one profile, against a fresh fault site.

A new site is started for every crawl, because the recovering hosts' failure
window and the rate-limited hosts' token buckets start with the site. The crawl
runs ``python -m benchmarks.crawl`` in a subprocess while a thread samples the
resident memory of its process tree with psutil.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from faultsite.testing import RunningSite, start_site

from benchmarks.metrics import compute_metrics
from benchmarks.profiles import is_bundle, settings_for
from benchmarks.scenarios import Scenario, site_config, start_urls

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = REPO / "example_project"

#: Seconds between two memory samples of the crawl's process tree.
SAMPLE_SECONDS = 0.2

#: Seconds a crawl gets to stop after SIGINT before it is killed.
STOP_GRACE_SECONDS = 60

#: Seconds a crawl process may run past its scenario's time limit (start-up, and
#: the close after CLOSESPIDER_TIMEOUT) before the harness stops it.
PROCESS_MARGIN_SECONDS = 60

#: Seconds the site's request log must stay unchanged after the crawl before it is
#: read. The site logs a request just after writing its response.
LOG_SETTLE_SECONDS = 0.5


class MemorySampler:
    """Sample the summed RSS of a process and its descendants in a thread.

    ``peak_bytes`` is the largest sum seen. A process that exits between listing
    and reading is skipped, so the peak can miss a child's last moments.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            self.samples += 1
            self._stop.wait(self.interval)


@dataclass
class CrawlOutcome:
    """The crawl process's record (None when it wrote none) and how it ended."""

    record: dict[str, Any] | None
    returncode: int
    timed_out: bool
    peak_rss_bytes: int


def crawl_environment() -> dict[str, str]:
    """Return the environment of a crawl process: the repository and the example
    project on ``PYTHONPATH``."""
    env = dict(os.environ)
    paths = [str(REPO), str(EXAMPLE_PROJECT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return env


def run_crawl(spec: dict[str, Any], workdir: Path, timeout: float) -> CrawlOutcome:
    """Run ``benchmarks.crawl`` with ``spec`` and return its record.

    A crawl still running after ``timeout`` seconds gets SIGINT (Scrapy's graceful
    stop, which still writes the record), then SIGKILL after STOP_GRACE_SECONDS.
    """
    output = workdir / "record.json"
    output.unlink(missing_ok=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps({**spec, "output": str(output)}), encoding="utf-8")

    timed_out = False
    with (workdir / "crawl-output.log").open("wb") as console:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.crawl", str(spec_path)],
            cwd=REPO,
            env=crawl_environment(),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=console,
        )
        sampler = MemorySampler(process.pid)
        sampler.start()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            logger.warning("crawl still running after %.0f s; sending SIGINT", timeout)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            sampler.stop()

    record = json.loads(output.read_text(encoding="utf-8")) if output.exists() else None
    return CrawlOutcome(record, process.returncode, timed_out, sampler.peak_bytes)


def settled_log(site: RunningSite) -> list[dict[str, Any]]:
    """Return the site's request log once no record has arrived for a moment."""
    deadline = time.monotonic() + 10 * LOG_SETTLE_SECONDS
    records = site.requests()
    while time.monotonic() < deadline:
        time.sleep(LOG_SETTLE_SECONDS)
        latest = site.requests()
        if len(latest) == len(records):
            return latest
        records = latest
    return records


def run_once(
    scenario: Scenario, profile: str, quick: bool, workdir: Path, seed: int = 1
) -> dict[str, Any]:
    """Crawl ``scenario`` once with ``profile`` against a new site; return its metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    size = scenario.size(quick)
    settings = settings_for(profile, scenario.settings, scenario.memory_limit_mb)
    settings["CLOSESPIDER_TIMEOUT"] = scenario.time_limit
    settings["LOG_FILE"] = str(workdir / "crawl.log")

    site = start_site(site_config(size, seed), workdir / "site", timeout=120)
    try:
        spec = {
            "settings": settings,
            "start": start_urls(size, site.urls),
            "follow": True,
            "bundle_cpu": is_bundle(profile),
            "measure_registry": scenario.measure_registry and is_bundle(profile),
            "retain_kb": scenario.retain_kb,
            "retain_seconds": scenario.retain_seconds,
        }
        outcome = run_crawl(spec, workdir, scenario.time_limit + PROCESS_MARGIN_SECONDS)
        log = settled_log(site)
        ready = site.ready
    finally:
        site.stop()

    metrics = compute_metrics(size, ready, log, outcome.record, settings)
    metrics.update(
        {
            "scenario": scenario.name,
            "profile": profile,
            "returncode": outcome.returncode,
            "timed_out": outcome.timed_out,
            "peak_rss_mb": outcome.peak_rss_bytes / 2**20,
        }
    )
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
