"""A real Scrapyd on loopback for tests: start, deploy, schedule, wait, cancel, read.

The module is not named ``scrapyd`` on purpose: pytest puts ``tests/`` on
``sys.path``, where that name would hide the real package.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from urllib.request import urlopen

#: Seconds between two polls of Scrapyd's API.
POLL_SECONDS = 0.25

#: Bound of one HTTP request to Scrapyd, in seconds.
REQUEST_TIMEOUT = 10.0

#: A record header in a Scrapy log with the default ``LOG_FORMAT``.
LOG_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(?P<logger>[^\]]+)\] (?P<level>[A-Z]+): "
)

#: One ``'key': value`` line of the stats that Scrapy dumps at close.
STATS_LINE = re.compile(r"^\s*'(?P<key>[^']+)': (?P<value>.*?),?\s*$")

#: Folders and files of a Scrapy project that never go into a deployed copy.
DEPLOY_IGNORED = ("__pycache__", "*.pyc", "output", "build", "setup.py", "*.egg-info")


class ScrapydError(RuntimeError):
    """Scrapyd did not start, rejected an API call, or a job did not end in time."""


@dataclass(frozen=True)
class LogRecord:
    """One record of a Scrapy log: logger name, level name, and the whole message."""

    logger: str
    level: str
    message: str


@dataclass(frozen=True)
class Job:
    """A finished job as ``listjobs.json`` lists it, with its duration in seconds."""

    id: str
    start_time: datetime
    end_time: datetime

    @property
    def duration(self) -> float:
        """Seconds from the job's start to its end, by Scrapyd's wall clock."""
        return (self.end_time - self.start_time).total_seconds()


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago (bind to 0, close)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Scrapyd:
    """A Scrapyd process started with this interpreter, its data kept in ``workdir``.

    Scrapyd reads ``scrapyd.conf`` from its working directory, so the directory
    gets its own config. Stop the process with :meth:`stop`.
    """

    def __init__(self, workdir: Path, max_proc: int = 2, poll_interval: float = 0.5) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.logs_dir = workdir / "logs"
        self.items_dir = workdir / "items"
        self.log_path = workdir / "scrapyd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.max_proc = max_proc
        self.poll_interval = poll_interval

    @property
    def url(self) -> str:
        """The base URL of the Scrapyd API, ending with a slash."""
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 30.0) -> None:
        """Write ``scrapyd.conf``, start Scrapyd and wait until its API responds.

        Raise ScrapydError with Scrapyd's output when the process exits first or
        the API does not respond within ``timeout`` seconds.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with self.log_path.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scrapyd"],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ScrapydError(
                    f"Scrapyd exited with code {self.process.returncode}:\n{self.output()}"
                )
            try:
                if self.get("daemonstatus.json")["status"] == "ok":
                    return
            except OSError:
                pass
            time.sleep(POLL_SECONDS)
        self.stop()
        raise ScrapydError(f"Scrapyd did not respond within {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Scrapyd by PID: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        """Return what Scrapyd has logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, endpoint: str, **params: str) -> dict[str, Any]:
        """Send a GET to an API endpoint and return the decoded JSON response."""
        query = f"?{urlencode(params)}" if params else ""
        with urlopen(self.url + endpoint + query, timeout=REQUEST_TIMEOUT) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def post(self, endpoint: str, fields: list[tuple[str, str]]) -> dict[str, Any]:
        """Send a form POST to an API endpoint and return the decoded JSON response.

        Raise ScrapydError unless the response has the status ``ok``.
        """
        body = urlencode(fields).encode()
        with urlopen(self.url + endpoint, data=body, timeout=REQUEST_TIMEOUT) as response:
            result: dict[str, Any] = json.load(response)
        if result.get("status") != "ok":
            raise ScrapydError(f"{endpoint} failed for {fields!r}: {result!r}")
        return result

    def deploy(self, project_dir: Path, workdir: Path, timeout: float = 120.0) -> Path:
        """Deploy a copy of ``project_dir`` with ``scrapyd-deploy``; return the copy.

        The copy, made in ``workdir``, gets a ``scrapy.cfg`` whose ``[deploy]``
        URL points at this Scrapyd, so the egg build leftovers (``setup.py``,
        ``build/``, ``*.egg-info``) never land in ``project_dir``. Raise
        ScrapydError with the command's output when it fails.
        """
        copy = workdir / project_dir.name
        shutil.copytree(project_dir, copy, ignore=shutil.ignore_patterns(*DEPLOY_IGNORED))
        config = configparser.ConfigParser()
        config.read(copy / "scrapy.cfg", encoding="utf-8")
        config["deploy"]["url"] = self.url
        with (copy / "scrapy.cfg").open("w", encoding="utf-8") as file:
            config.write(file)

        command = [_scrapyd_deploy()]
        done = subprocess.run(
            command, cwd=copy, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0 or '"status": "ok"' not in done.stdout:
            raise ScrapydError(
                f"scrapyd-deploy failed with code {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return copy

    def schedule(
        self, project: str, spider: str, settings: dict[str, Any], **arguments: str
    ) -> str:
        """Schedule a job with ``setting=NAME=VALUE`` fields; return its job id."""
        fields = [("project", project), ("spider", spider)]
        fields += [("setting", f"{name}={value}") for name, value in settings.items()]
        fields += list(arguments.items())
        return str(self.post("schedule.json", fields)["jobid"])

    def cancel(self, project: str, job: str) -> None:
        """Cancel a job with ``cancel.json``, which sends SIGINT to a running one."""
        self.post("cancel.json", [("project", project), ("job", job)])

    def wait_for_job(self, project: str, job: str, timeout: float) -> Job:
        """Poll ``listjobs.json`` until the job is finished and return it.

        Raise ScrapydError when it is not finished within ``timeout`` seconds or
        after the number of polls that time allows.
        """
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL_SECONDS) + 1):
            for entry in self.get("listjobs.json", project=project)["finished"]:
                if entry["id"] == job:
                    return Job(
                        id=job,
                        start_time=datetime.fromisoformat(entry["start_time"]),
                        end_time=datetime.fromisoformat(entry["end_time"]),
                    )
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        raise ScrapydError(f"job {job} did not finish within {timeout} s")

    def job_log(self, project: str, spider: str, job: str) -> str:
        """Return the job's Scrapy log, or an empty string when there is none yet."""
        path = self.logs_dir / project / spider / f"{job}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def job_items(self, project: str, spider: str, job: str) -> list[dict[str, Any]]:
        """Return the items the job wrote to Scrapyd's ``items_dir``."""
        path = self.items_dir / project / spider / f"{job}.jl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]

    def _write_config(self) -> None:
        config = configparser.ConfigParser()
        config["scrapyd"] = {
            "bind_address": "127.0.0.1",
            "http_port": str(self.port),
            "eggs_dir": str(self.workdir / "eggs"),
            "logs_dir": str(self.logs_dir),
            "dbs_dir": str(self.workdir / "dbs"),
            "items_dir": str(self.items_dir),
            "max_proc": str(self.max_proc),
            "poll_interval": str(self.poll_interval),
            # By default Scrapyd deletes all but the newest 5 log and items files
            # of a spider when a job starts, and a test may read them later.
            "jobs_to_keep": "100",
        }
        with (self.workdir / "scrapyd.conf").open("w", encoding="utf-8") as file:
            config.write(file)


def _scrapyd_deploy() -> str:
    # The script installed beside this interpreter, so the egg is built with the
    # same environment as the tests, even when that environment is not on PATH.
    beside = Path(sys.executable).parent / "scrapyd-deploy"
    if beside.exists():
        return str(beside)
    found = shutil.which("scrapyd-deploy")
    if found is None:
        raise ScrapydError("scrapyd-deploy not found: install the package's [scrapyd] extra")
    return found


def log_records(text: str, levels: tuple[str, ...] | None = None) -> list[LogRecord]:
    """Split a Scrapy log into records, keeping those at ``levels`` (all when None).

    Lines that do not start a record (tracebacks, multi-line messages) belong to
    the record before them.
    """
    records: list[LogRecord] = []
    for line in text.splitlines():
        header = LOG_RECORD.match(line)
        if header:
            records.append(LogRecord(header["logger"], header["level"], line[header.end() :]))
        elif records:
            last = records[-1]
            records[-1] = LogRecord(last.logger, last.level, last.message + "\n" + line)
    if levels is None:
        return records
    return [record for record in records if record.level in levels]


def dumped_stats(text: str) -> dict[str, Any]:
    """Return the stats of the last ``Dumping Scrapy stats`` record of a log.

    Numbers and strings are parsed; other values (datetimes) stay as their text.
    Return an empty dict when the log has no stats dump.
    """
    dumps = [
        record.message
        for record in log_records(text)
        if record.message.startswith("Dumping Scrapy stats:")
    ]
    if not dumps:
        return {}

    stats: dict[str, Any] = {}
    for line in dumps[-1].splitlines()[1:]:
        match = STATS_LINE.match(line.lstrip("{").rstrip("}"))
        if match is None:
            continue
        value = match["value"]
        try:
            stats[match["key"]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            stats[match["key"]] = value
    return stats
