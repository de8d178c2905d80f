"""Shared fixtures: the fault site on loopback and real crawls in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = REPO / "example_project"
sys.path.insert(0, str(EXAMPLE_PROJECT))

from faultsite.testing import RunningSite, start_site  # noqa: E402


def _install_asyncio_reactor() -> None:
    """Install Scrapy's default reactor in the test process.

    Scrapy 2.13's ``get_crawler`` refuses to build a crawler without an
    installed reactor; 2.14 and later do not need one, and accept it.
    """
    import twisted.internet
    from scrapy.utils.reactor import install_reactor

    if not hasattr(twisted.internet, "reactor"):
        install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")


_install_asyncio_reactor()

#: Settings every test crawl starts from: the add-on, the loopback guard, and
#: short timings so a crawl through faults stays well under a minute.
BASE_SETTINGS: dict[str, Any] = {
    "ADDONS": {"scrapy_resilience.Addon": 500},
    "DOWNLOADER_MIDDLEWARES": {"example_project.middlewares.LoopbackGuardMiddleware": 10},
    "ROBOTSTXT_OBEY": False,
    "DOWNLOAD_TIMEOUT": 5,
    "CONCURRENT_REQUESTS": 16,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 8,
    "RESILIENCE_CIRCUIT_OPEN_SECONDS": 3,
    "RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS": 12,
    "RESILIENCE_RETRY_BACKOFF_BASE": 0.2,
    "RESILIENCE_RETRY_BACKOFF_MAX": 2,
    "LOG_LEVEL": "DEBUG",
}

#: Starts the crawl from a small process and passes SIGINT and SIGTERM on.
#: Linux carries the peak RSS of the process that calls exec into the new
#: program's ``ru_maxrss``, so a crawl started straight from a pytest process
#: of 200 MB would report that peak as its own, and Scrapy's MemoryUsage
#: would read it too.
LAUNCHER = """
import signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda received, frame: child.send_signal(received))
sys.exit(child.wait())
"""

#: Wall-clock bound of one test crawl process; a crawl that hits it failed.
CRAWL_TIMEOUT = 150


@dataclass
class CrawlResult:
    """What one crawl did, from the client's side."""

    record: dict[str, Any]
    log: str
    returncode: int

    @property
    def stats(self) -> dict[str, Any]:
        return self.record["stats"]

    def callback_urls(self) -> Counter[str]:
        return Counter(entry["url"] for entry in self.record["callbacks"])

    def errbacks(self) -> list[dict[str, Any]]:
        return self.record["errbacks"]

    def paths_by_host(self, address: str) -> set[str]:
        return {
            urlsplit(entry["url"]).path
            for entry in self.record["callbacks"]
            if urlsplit(entry["url"]).hostname == address
        }


def run_crawl(
    workdir: Path,
    start: list[Any],
    settings: dict[str, Any] | None = None,
    *,
    follow: bool = True,
    timeout: float = CRAWL_TIMEOUT,
    stop_after: float | None = None,
    **spec: Any,
) -> CrawlResult:
    """Run ``tests/crawlrunner.py`` in a new process and return its record.

    ``stop_after`` sends SIGINT after that many seconds (a graceful stop, like
    Ctrl-C); otherwise the crawl must end by itself within ``timeout``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / "record.json"
    output.unlink(missing_ok=True)
    spec_path = workdir / "spec.json"
    merged = {**BASE_SETTINGS, **(settings or {})}
    merged.setdefault("LOG_FILE", str(workdir / "crawl.log"))
    spec_path.write_text(
        json.dumps(
            {"settings": merged, "start": start, "follow": follow, "output": str(output), **spec}
        )
    )

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(EXAMPLE_PROJECT), env.get("PYTHONPATH", "")]
    )
    with (workdir / "crawl-stderr.log").open("wb") as stderr:
        runner = [sys.executable, str(REPO / "tests" / "crawlrunner.py"), str(spec_path)]
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *runner],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            if stop_after is not None:
                try:
                    process.wait(stop_after)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGINT)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            # The launcher and the crawl share the session this call created.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log = Path(merged["LOG_FILE"]).read_text(errors="replace")[-5000:]
            pytest.fail(f"crawl did not finish within {timeout}s; end of its log:\n{log}")

    log_text = (
        Path(merged["LOG_FILE"]).read_text(errors="replace")
        if Path(merged["LOG_FILE"]).exists()
        else ""
    )
    if not output.exists():
        stderr_text = (workdir / "crawl-stderr.log").read_text(errors="replace")
        return CrawlResult(
            {"stats": {}, "callbacks": [], "errbacks": []},
            log_text + stderr_text,
            process.returncode,
        )
    return CrawlResult(json.loads(output.read_text()), log_text, process.returncode)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[..., RunningSite]]:
    """Start fault sites for one test and stop them after it."""
    running: list[RunningSite] = []

    def start(hosts: list[dict[str, Any]], **config: Any) -> RunningSite:
        full = {"seed": 1, "root": "generated", "pages": 40, "hosts": hosts, **config}
        instance = start_site(full, tmp_path / f"site{len(running)}")
        running.append(instance)
        return instance

    yield start
    for instance in running:
        instance.stop()


@pytest.fixture
def crawl(tmp_path: Path) -> Callable[..., CrawlResult]:
    counter = iter(range(100))

    def run(start: list[Any], settings: dict[str, Any] | None = None, **kwargs: Any) -> CrawlResult:
        return run_crawl(tmp_path / f"crawl{next(counter)}", start, settings, **kwargs)

    return run
