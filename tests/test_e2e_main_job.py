"""The main job: the example project crawls the real Python documentation on
eight fault-site hosts and must get every reachable page of every reachable
host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultsite import DOCS_ROOT, reachable_pages

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.docs]

UNREACHABLE_PROFILES = {"dead", "blackhole"}


def test_main_job_scrapes_every_reachable_page(tmp_path: Path) -> None:
    if not Path(DOCS_ROOT, "index.html").exists():
        if os.environ.get("CI"):
            pytest.fail(f"Debian's python3-doc is missing ({DOCS_ROOT}); .ci/run must install it")
        pytest.skip("Debian's python3-doc is not installed")

    completed = subprocess.run(
        [sys.executable, str(REPO / "example_project" / "run_main_job.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    expected = reachable_pages(DOCS_ROOT)
    assert len(expected) == 526

    ready = json.loads((tmp_path / "site" / "ready.json").read_text())
    scraped: dict[str, set[str]] = defaultdict(set)
    with (tmp_path / "items.jsonl").open() as items:
        for line in items:
            url = json.loads(line)["url"]
            scraped[urlsplit(url).hostname or ""].add(urlsplit(url).path)

    for name, host in ready["hosts"].items():
        if host["profile"] in UNREACHABLE_PROFILES:
            assert not scraped.get(host["address"]), name
            continue
        missing = expected - scraped[host["address"]]
        assert not missing, f"{name}: {len(missing)} pages missing, e.g. {sorted(missing)[:5]}"

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finish_reason"] == "finished"
    given_up = {key for key, domain in report["domains"].items() if domain["given_up"]}
    unreachable = {
        host["address"]
        for host in ready["hosts"].values()
        if host["profile"] in UNREACHABLE_PROFILES
    }
    assert given_up == unreachable
    assert report["elapsed_seconds"] < 300
