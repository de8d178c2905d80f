"""Start a fault site in a subprocess from tests and scripts.

Example::

    with start_site({"hosts": [{"name": "a", "profile": "healthy"}]}, tmp_path) as site:
        fetch(site.urls["a"] + "index.html")
        assert site.wait_for_requests(1, "a")[0]["status"] == 200
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

#: The folder that contains the ``faultsite`` package (``example_project/``).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent

_POLL_SECONDS = 0.02


class SiteStartError(RuntimeError):
    """The site process exited or did not become ready in time."""


class RunningSite:
    """A fault site process started by ``start_site``; stop it with ``stop()``.

    ``ready`` is the parsed ready file, and ``log_path`` the request log.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], ready: dict[str, Any], log_path: Path
    ) -> None:
        self.process = process
        self.ready = ready
        self.log_path = log_path

    @property
    def urls(self) -> dict[str, str]:
        """Base URL of every host by name, such as ``http://127.0.0.2:41234/``."""
        return {name: host["url"] for name, host in self.ready["hosts"].items()}

    @property
    def started(self) -> float:
        """The site's start time on the monotonic clock (comparable across processes)."""
        return float(self.ready["started"])

    @property
    def port(self) -> int:
        """The port shared by the site's listeners."""
        return int(self.ready["port"])

    @property
    def pid(self) -> int:
        """The process id of the site."""
        return self.process.pid

    def url(self, host: str, path: str = "") -> str:
        """Return the URL of ``path`` (without its leading slash) on a host."""
        return self.urls[host] + path.lstrip("/")

    def requests(self, host: str | None = None) -> list[dict[str, Any]]:
        """Return the request log records written so far, of one host or of all.

        The site writes a record just after it has written the response, so a client
        can hold a response whose record is not in the log yet: use
        ``wait_for_requests`` right after a request. A last line still being written
        is skipped.
        """
        records = []
        with self.log_path.open(encoding="utf-8") as log:
            for line in log:
                if not line.endswith("\n"):
                    break
                record = json.loads(line)
                if host is None or record["host"] == host:
                    records.append(record)
        return records

    def wait_for_requests(
        self, count: int, host: str | None = None, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Return the log records (as ``requests``) once there are at least ``count``.

        Raise TimeoutError when fewer than ``count`` records exist after ``timeout``
        seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = self.requests(host)
            if len(records) >= count:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(records)} of {count} request records for host {host!r} after {timeout} s"
                )
            time.sleep(_POLL_SECONDS)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the site with SIGTERM, then SIGKILL after ``timeout``; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> RunningSite:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_site(config: Mapping[str, Any], workdir: Path, timeout: float = 15.0) -> RunningSite:
    """Start ``python -m faultsite`` with the config and wait until it is ready.

    Writes ``site.json``, ``requests.jsonl``, ``ready.json`` and ``site-stderr.log``
    in ``workdir``. Raise SiteStartError with the server's stderr when the process
    exits before it is ready, or when it is not ready within ``timeout`` seconds
    (then the process is killed).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "site.json"
    log_path = workdir / "requests.jsonl"
    ready_path = workdir / "ready.json"
    stderr_path = workdir / "site-stderr.log"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    ready_path.unlink(missing_ok=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "faultsite",
        "--config", str(config_path),
        "--log", str(log_path),
        "--ready", str(ready_path),
    ]  # fmt: skip
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            cwd=PACKAGE_PARENT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    deadline = time.monotonic() + timeout
    while not ready_path.exists():
        if process.poll() is not None:
            raise SiteStartError(
                f"fault site exited with code {process.returncode} before it was ready:\n"
                + stderr_path.read_text(encoding="utf-8", errors="replace")
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise SiteStartError(
                f"fault site was not ready after {timeout} s:\n"
                + stderr_path.read_text(encoding="utf-8", errors="replace")
            )
        time.sleep(_POLL_SECONDS)

    ready = json.loads(ready_path.read_text(encoding="utf-8"))
    return RunningSite(process, ready, log_path)
