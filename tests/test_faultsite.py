"""Tests of the fault site: real server processes on loopback, real sockets."""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

EXAMPLE_PROJECT = Path(__file__).resolve().parents[1] / "example_project"
sys.path.insert(0, str(EXAMPLE_PROJECT))

import faultsite  # noqa: E402
from faultsite.testing import RunningSite, SiteStartError, start_site  # noqa: E402

SEED = 7
PAGES = 30

# Timeouts of every client call, so no test can hang on a server bug.
CLIENT_TIMEOUT = 3.0

SHARED_HOSTS: list[dict[str, Any]] = [
    {
        "name": "healthy",
        "address": "127.0.0.2",
        "profile": "healthy",
        "latency": 0.05,
        "robots_txt": "User-agent: *\nDisallow: /private/\n",
    },
    {"name": "dead", "address": "127.0.0.3", "profile": "dead"},
    {"name": "blackhole", "address": "127.0.0.4", "profile": "blackhole"},
    {"name": "flaky", "address": "127.0.0.5", "profile": "flaky", "rate": 0.5, "retry_after": 3},
    {
        "name": "limited",
        "address": "127.0.0.6",
        "profile": "rate_limited",
        # One token per 50 s: no token comes back during the test.
        "rate": 0.02,
        "burst": 3,
        "retry_after": 7,
        "ratelimit_headers": True,
    },
    {
        "name": "limited_date",
        "address": "127.0.0.7",
        "profile": "rate_limited",
        "rate": 0.02,
        "burst": 1,
        "retry_after": 30,
        "retry_after_mode": "http-date",
    },
    {"name": "ban", "address": "127.0.0.8", "profile": "ban"},
    {"name": "reset", "address": "127.0.0.9", "profile": "reset"},
    {"name": "crawled", "address": "127.0.0.10", "profile": "healthy"},
    {"name": "virtual_ok", "hostname": "ok.test", "profile": "healthy"},
    {"name": "virtual_flaky", "hostname": "flaky.test", "profile": "flaky", "rate": 1.0},
    {"name": "virtual_dead", "hostname": "dead.test", "profile": "dead"},
]


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSite]:
    config = {
        "seed": SEED,
        "root": "generated",
        "pages": PAGES,
        "js_pages": 4,
        "hosts": SHARED_HOSTS,
    }
    site = start_site(config, tmp_path_factory.mktemp("shared-site"))
    yield site
    site.stop()


def address_of(site: RunningSite, host: str) -> str:
    return str(site.ready["hosts"][host]["address"])


def connect(site: RunningSite, host: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(address_of(site, host), site.port, timeout=CLIENT_TIMEOUT)


def get(site: RunningSite, host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = connect(site, host)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def records_for(site: RunningSite, host: str, path: str, count: int = 1) -> list[dict[str, Any]]:
    """Return the host's log records for the path, once ``count`` are written (5 s at most)."""
    deadline = time.monotonic() + 5
    while True:
        records = [record for record in site.requests(host) if record["path"] == path]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        # The site logs a request just after it responded, so give it a moment.
        time.sleep(0.01)


# Pure decisions


def test_flaky_fails_is_deterministic() -> None:
    first = [faultsite.flaky_fails(1, "h", "/a.html", attempt, 0.4) for attempt in range(1, 50)]
    second = [faultsite.flaky_fails(1, "h", "/a.html", attempt, 0.4) for attempt in range(1, 50)]
    other_seed = [
        faultsite.flaky_fails(2, "h", "/a.html", attempt, 0.4) for attempt in range(1, 50)
    ]

    assert first == second
    assert first != other_seed


def test_flaky_fails_rate_bounds() -> None:
    attempts = range(1, 200)
    assert not any(faultsite.flaky_fails(1, "h", "/", attempt, 0.0) for attempt in attempts)
    assert all(faultsite.flaky_fails(1, "h", "/", attempt, 1.0) for attempt in attempts)

    failures = sum(faultsite.flaky_fails(3, "h", f"/{n}.html", 1, 0.3) for n in range(4000))
    assert 0.27 < failures / 4000 < 0.33


def test_token_bucket_burst_then_refill() -> None:
    bucket = faultsite.TokenBucket(rate=2.0, burst=3)

    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False
    assert bucket.take(100.5) is True
    assert bucket.remaining(100.5) == 0
    assert bucket.remaining(200.0) == 3


def test_token_bucket_penalizes_rejected() -> None:
    bucket = faultsite.TokenBucket(rate=1.0, burst=2, penalize_rejected=True)
    for _ in range(2):
        assert bucket.take(0.0)

    for _ in range(10):
        assert not bucket.take(0.0)
    assert bucket.level == -2.0

    # Without the penalty, 2.5 s would refill the full burst. With it, the level
    # is 0.5 and this rejection takes it down to -0.5.
    assert not bucket.take(2.5)
    assert bucket.level == -0.5
    assert bucket.take(4.0)


# Configuration


def run_cli(args: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE_PROJECT)}
    return subprocess.run(
        [sys.executable, "-m", "faultsite", *args],
        cwd=EXAMPLE_PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ({"name": "h1", "profile": "flaky", "rte": 0.4}, ["h1", "rte"]),
        ({"name": "h2", "profile": "flaky", "rate": 1.5}, ["h2", "rate"]),
        ({"name": "h3", "profile": "rate_limited", "burst": 0}, ["h3", "burst"]),
        ({"name": "h4", "profile": "healthy", "address": "10.0.0.2"}, ["h4", "address"]),
        ({"name": "h5", "profile": "healthy", "latency": [0.5, 0.1]}, ["h5", "latency"]),
        ({"name": "h6", "profile": "slow"}, ["h6", "profile"]),
        ({"name": "h7", "hostname": "h7.test", "profile": "recovering"}, ["h7", "fail_mode"]),
        (
            {"name": "h8", "profile": "healthy", "latency_schedule": [[5, 0.1], [3, 0.2]]},
            ["h8", "latency_schedule"],
        ),
        (
            {"name": "h9", "profile": "healthy", "latency_schedule": [[0, -0.1]]},
            ["h9", "latency_schedule"],
        ),
        (
            {"name": "h10", "profile": "healthy", "latency_schedule": [[1.5, 0.1]]},
            ["h10", "latency_schedule"],
        ),
    ],
)
def test_bad_config_names_host_and_key(
    tmp_path: Path, host: dict[str, Any], named: list[str]
) -> None:
    config_path = tmp_path / "site.json"
    config_path.write_text(json.dumps({"root": "generated", "hosts": [host]}))

    result = run_cli(["--config", str(config_path), "--log", str(tmp_path / "log.jsonl")])

    assert result.returncode == 2
    for word in named:
        assert repr(word) in result.stderr


def test_start_site_reports_stderr(tmp_path: Path) -> None:
    config = {"hosts": [{"name": "x", "profile": "flaky", "rate": -1}]}

    with pytest.raises(SiteStartError, match="'rate'"):
        start_site(config, tmp_path)


def test_cli_host_flags_and_sigterm(tmp_path: Path) -> None:
    ready_path = tmp_path / "ready.json"
    log_path = tmp_path / "log.jsonl"
    command = [
        sys.executable, "-m", "faultsite", "--root", "generated", "--pages", "5", "--seed", "3",
        "--host", "a=healthy:latency=[0.01,0.02],address=127.0.0.2",
        "--host", "b=flaky:rate=1.0",
        "--log", str(log_path), "--ready", str(ready_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE_PROJECT)}
    process = subprocess.Popen(command, cwd=EXAMPLE_PROJECT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not ready_path.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        ready = json.loads(ready_path.read_text())
        port = ready["port"]

        assert ready["pid"] == process.pid
        assert ready["seed"] == 3
        assert ready["hosts"]["a"]["url"] == f"http://127.0.0.2:{port}/"
        assert ready["hosts"]["b"]["address"] == "127.0.0.3"
        connection = http.client.HTTPConnection("127.0.0.3", port, timeout=CLIENT_TIMEOUT)
        connection.request("GET", "/index.html")
        assert connection.getresponse().status == 503
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)

    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [record["status"] for record in records] == [503]


# Ready file and request log


def test_ready_file_lists_every_host(shared_site: RunningSite) -> None:
    ready = shared_site.ready
    port = shared_site.port

    assert ready["pid"] == shared_site.pid
    assert set(ready["hosts"]) == {host["name"] for host in SHARED_HOSTS}
    assert ready["hosts"]["healthy"] == {
        "url": f"http://127.0.0.2:{port}/",
        "address": "127.0.0.2",
        "port": port,
        "profile": "healthy",
    }
    assert ready["hosts"]["dead"]["url"] == f"http://127.0.0.3:{port}/"
    assert ready["hosts"]["virtual_ok"]["url"] == f"http://ok.test:{port}/"
    assert ready["hosts"]["virtual_ok"]["address"] == "127.0.0.1"
    assert ready["content"] == {"root": "generated", "pages": PAGES, "js_pages": 4}
    assert ready["started"] <= time.monotonic()


def test_log_times_bracket_response(shared_site: RunningSite) -> None:
    before = time.monotonic()
    status, _headers, _body = get(shared_site, "healthy", "/section-1/page-1.html")
    after = time.monotonic()

    [record] = records_for(shared_site, "healthy", "/section-1/page-1.html")
    assert status == 200
    assert record["status"] == 200
    assert record["outcome"] == "served"
    assert record["address"] == "127.0.0.2"
    assert record["method"] == "GET"
    assert record["attempt"] == 1
    assert before <= record["arrival"] <= after
    assert record["arrival"] >= shared_site.started
    # The configured latency passes between arrival and response.
    assert record["answered"] - record["arrival"] >= 0.05
    # The server reads its clock just after the kernel took the response, so the
    # client may read the response a little earlier. One second is a margin for load.
    assert record["answered"] < after + 1.0


def test_latency_schedule_changes_latency(tmp_path: Path) -> None:
    schedule = [[0, 0.0], [2, [0.3, 0.3]], [4, 0.0]]
    config = {
        "root": "generated",
        "pages": 5,
        "hosts": [
            {
                "name": "slowing",
                "address": "127.0.0.2",
                "profile": "healthy",
                "latency_schedule": schedule,
            }
        ],
    }
    with start_site(config, tmp_path) as site:
        for _ in range(5):
            status, _headers, _body = get(site, "slowing", "/index.html")
            assert status == 200
        records = site.wait_for_requests(5, "slowing")

    durations = [record["answered"] - record["arrival"] for record in records]
    # Requests 3 and 4 follow the host's first 2 requests; request 5 follows its first 4.
    assert [duration >= 0.3 for duration in durations] == [False, False, True, True, False]
    # A margin for a loaded machine: the fast responses take no scheduled time.
    assert max(durations[:2] + durations[4:]) < 0.2


def test_keep_alive_serves_several_requests(shared_site: RunningSite) -> None:
    connection = connect(shared_site, "healthy")
    statuses = []
    for path in ("/section-2/page-2.html", "/section-3/page-3.html", "/missing.html"):
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    connection.close()

    assert statuses == [200, 200, 404]
    first = records_for(shared_site, "healthy", "/section-2/page-2.html")
    last = records_for(shared_site, "healthy", "/missing.html")
    assert len(first) == 1
    assert len(last) == 1
    assert first[0]["connection"] == last[0]["connection"]


def test_content_types_and_redirects(shared_site: RunningSite) -> None:
    status, headers, body = get(shared_site, "healthy", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert b"<title>Generated page 0</title>" in body

    status, headers, _body = get(shared_site, "healthy", "/section-1")
    assert status == 301
    assert headers["Location"] == "/section-1/"

    status, headers, body = get(shared_site, "healthy", "/robots.txt")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"User-agent: *\nDisallow: /private/\n"

    status, _headers, _body = get(shared_site, "healthy", "/../etc/passwd")
    assert status == 404


def test_js_pages_need_a_browser(shared_site: RunningSite) -> None:
    status, _headers, index = get(shared_site, "healthy", "/js/index.html")
    assert status == 200
    for number in range(1, 5):
        assert f'href="{number}.html"'.encode() in index

    status, _headers, page = get(shared_site, "healthy", "/js/2.html")
    assert status == 200
    assert b"<script>" in page
    assert faultsite.js_page_text(2).encode() not in page
    assert faultsite.js_page_title(2).encode() not in page


# Profiles


def test_dead_refuses_connections(shared_site: RunningSite) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(
            (address_of(shared_site, "dead"), shared_site.port), timeout=CLIENT_TIMEOUT
        )


def test_dead_virtual_host_refuses(shared_site: RunningSite) -> None:
    entry = shared_site.ready["hosts"]["virtual_dead"]

    assert entry["url"] == f"http://dead.test:{shared_site.port}/"
    assert entry["address"] == "127.255.255.254"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((entry["address"], entry["port"]), timeout=CLIENT_TIMEOUT)


def test_blackhole_never_responds(shared_site: RunningSite) -> None:
    connection = http.client.HTTPConnection(
        address_of(shared_site, "blackhole"), shared_site.port, timeout=0.5
    )
    connection.request("GET", "/index.html")
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()

    [record] = records_for(shared_site, "blackhole", "/index.html")
    assert record["outcome"] == "blackhole"
    assert record["status"] is None
    assert record["answered"] is None
    assert record["attempt"] == 1


def test_flaky_matches_flaky_fails(shared_site: RunningSite) -> None:
    path = "/section-4/page-4.html"
    expected = [
        503 if faultsite.flaky_fails(SEED, "flaky", path, attempt, 0.5) else 200
        for attempt in range(1, 13)
    ]
    assert 503 in expected
    assert 200 in expected

    connection = connect(shared_site, "flaky")
    statuses = []
    retry_afters = []
    for _ in expected:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        retry_afters.append(response.getheader("Retry-After"))
    connection.close()

    assert statuses == expected
    assert all(
        value == "3" for status, value in zip(statuses, retry_afters, strict=True) if status == 503
    )
    records = records_for(shared_site, "flaky", path, count=len(expected))
    assert [record["attempt"] for record in records] == list(range(1, 13))
    assert [record["outcome"] for record in records] == [
        "rejected" if s == 503 else "served" for s in expected
    ]


def test_rate_limited_after_burst(shared_site: RunningSite) -> None:
    connection = connect(shared_site, "limited")
    responses = []
    for number in range(5):
        connection.request("GET", f"/section-1/page-{1 + 6 * number}.html")
        response = connection.getresponse()
        response.read()
        responses.append(
            (
                response.status,
                response.getheader("Retry-After"),
                response.getheader("RateLimit-Remaining"),
            )
        )
    connection.close()

    assert [status for status, _, _ in responses] == [200, 200, 200, 429, 429]
    assert [retry_after for _, retry_after, _ in responses] == [None, None, None, "7", "7"]
    assert [remaining for _, _, remaining in responses] == ["2", "1", "0", "0", "0"]
    records = shared_site.wait_for_requests(5, "limited")
    rejected = [record for record in records if record["status"] == 429]
    assert [record["retry_after"] for record in rejected] == [7, 7]
    assert all(record["outcome"] == "rejected" for record in rejected)


def test_rate_limited_http_date(shared_site: RunningSite) -> None:
    get(shared_site, "limited_date", "/index.html")
    now = time.time()
    status, headers, _body = get(shared_site, "limited_date", "/index.html")

    assert status == 429
    retry_at = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert now + 30 <= retry_at <= now + 33


def test_ban_serves_block_page(shared_site: RunningSite) -> None:
    status, _headers, body = get(shared_site, "ban", "/index.html")

    assert status == 200
    assert faultsite.BAN_MARKER.encode() in body
    [record] = records_for(shared_site, "ban", "/index.html")
    assert record["outcome"] == "banned"


def test_reset_cuts_the_body(shared_site: RunningSite) -> None:
    connection = connect(shared_site, "reset")
    connection.request("GET", "/index.html")
    response = connection.getresponse()
    length = int(response.getheader("Content-Length"))

    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        response.read()
    connection.close()

    assert response.status == 200
    assert length > 100
    [record] = records_for(shared_site, "reset", "/index.html")
    assert record["outcome"] == "reset"


def test_reset_is_seen_mid_body_on_the_wire(shared_site: RunningSite) -> None:
    with socket.create_connection(
        (address_of(shared_site, "reset"), shared_site.port), timeout=CLIENT_TIMEOUT
    ) as sock:
        sock.sendall(b"GET /section-2/page-8.html HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(1000):
                chunk = sock.recv(65536)
                assert chunk, "the server closed with FIN instead of a reset"
                received += chunk

    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ).split(b":")[1]
    )
    assert 0 < len(body) < length


def test_virtual_hosts_by_host_header(shared_site: RunningSite) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", shared_site.port, timeout=CLIENT_TIMEOUT)
    statuses = {}
    for hostname in ("ok.test", "flaky.test", "unknown.test"):
        connection.request("GET", "/index.html", headers={"Host": f"{hostname}:{shared_site.port}"})
        response = connection.getresponse()
        response.read()
        statuses[hostname] = response.status
    connection.close()

    assert statuses == {"ok.test": 200, "flaky.test": 503, "unknown.test": 421}
    [record] = records_for(shared_site, "virtual_ok", "/index.html")
    assert record["hostname"] == "ok.test"
    assert record["address"] == "127.0.0.1"


def test_recovering_refuses_then_serves(tmp_path: Path) -> None:
    fail_seconds = 2.0
    config = {
        "root": "generated",
        "pages": 5,
        "hosts": [
            {
                "name": "refuse",
                "address": "127.0.0.2",
                "profile": "recovering",
                "fail_seconds": fail_seconds,
            },
            {
                "name": "unavailable",
                "address": "127.0.0.3",
                "profile": "recovering",
                "fail_seconds": fail_seconds,
                "fail_mode": "503",
                "retry_after": 1,
            },
        ],
    }
    with start_site(config, tmp_path) as site:
        window_end = site.started + fail_seconds
        early_status, early_headers, _body = get(site, "unavailable", "/index.html")

        refused_at: list[float] = []
        served = False
        while not served and time.monotonic() < window_end + 10:
            attempted_at = time.monotonic()
            try:
                status, _headers, _body = get(site, "refuse", "/index.html")
            except ConnectionRefusedError:
                refused_at.append(attempted_at)
                # Polling interval of the client, not a wait for the test to pass.
                time.sleep(0.05)
                continue
            served = True

        late_status, _headers, _body = get(site, "unavailable", "/index.html")
        refuse_records = site.wait_for_requests(1, "refuse")
        unavailable_records = site.wait_for_requests(2, "unavailable")

    assert served
    assert status == 200
    assert refused_at
    assert min(refused_at) < window_end
    # The listener opens when the window ends, with a margin for a loaded machine.
    assert max(refused_at) < window_end + 1
    assert [record["arrival"] >= window_end for record in refuse_records] == [True]

    assert [early_status, late_status] == [
        503 if record["arrival"] < window_end else 200 for record in unavailable_records
    ]
    assert late_status == 200
    if early_status == 503:
        assert early_headers["Retry-After"] == "1"


# Link closure


def test_reachable_pages_of_generated_site() -> None:
    pages = faultsite.reachable_pages("generated", pages=PAGES)

    assert pages == set(faultsite.generate_site(PAGES))
    assert "/index.html" in pages
    assert len(pages) == PAGES


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.skipif(not faultsite.DOCS_ROOT.is_dir(), reason="python3-doc is not installed")
def test_reachable_pages_of_python_docs() -> None:
    pages = faultsite.reachable_pages(faultsite.DOCS_ROOT)

    assert len(pages) == 526
    assert "/library/os.html" in pages
    assert "/whatsnew/changelog.html" not in pages


# The example project: loopback guard and spider


def make_guard(settings: dict[str, Any]) -> tuple[Any, Any]:
    from example_project.middlewares import LoopbackGuardMiddleware
    from scrapy.utils.test import get_crawler

    crawler = get_crawler(settings_dict=settings)
    return LoopbackGuardMiddleware.from_crawler(crawler), crawler


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.2:8000/index.html", True),
        ("http://127.255.0.9/", True),
        ("http://[::1]:8080/", True),
        ("http://h1.test:9000/", True),
        ("http://H2.TEST/", True),
        ("http://localhost/", False),
        ("https://www.python.org/", False),
        ("http://10.0.0.1/", False),
        ("http://169.254.169.254/latest/", False),
        ("http://127.0.0.1.example.com/", False),
        ("http://test/", False),
    ],
)
def test_loopback_guard_hosts(url: str, allowed: bool) -> None:
    from scrapy import Request
    from scrapy.exceptions import IgnoreRequest

    guard, crawler = make_guard({"LOOPBACK_GUARD_ALLOWED_HOSTS": ["*.test"]})

    if allowed:
        assert guard.process_request(Request(url)) is None
        assert crawler.stats.get_value("loopback_guard/dropped") is None
    else:
        with pytest.raises(IgnoreRequest):
            guard.process_request(Request(url))
        assert crawler.stats.get_value("loopback_guard/dropped") == 1


def test_loopback_guard_logs_host_once(caplog: pytest.LogCaptureFixture) -> None:
    from scrapy import Request
    from scrapy.exceptions import IgnoreRequest

    guard, crawler = make_guard({})
    caplog.set_level("INFO", logger="example_project.middlewares")
    for path in ("a", "b", "c"):
        with pytest.raises(IgnoreRequest):
            guard.process_request(Request(f"https://docs.example.org/{path}"))

    messages = [
        record.getMessage()
        for record in caplog.records
        if record.name == "example_project.middlewares"
    ]
    assert len(messages) == 1
    assert "docs.example.org" in messages[0]
    assert crawler.stats.get_value("loopback_guard/dropped") == 3


def test_loopback_guard_switch_off() -> None:
    from scrapy.exceptions import NotConfigured

    with pytest.raises(NotConfigured):
        make_guard({"LOOPBACK_GUARD_ENABLED": False})


def test_same_origin_rules() -> None:
    from example_project.spiders.docs import is_same_origin

    page = "http://127.0.0.2:8000/library/os.html"
    assert is_same_origin("http://127.0.0.2:8000/index.html", page)
    assert not is_same_origin("http://127.0.0.2:8001/index.html", page)
    assert not is_same_origin("https://127.0.0.2:8000/index.html", page)
    assert not is_same_origin("http://127.0.0.3:8000/index.html", page)
    assert not is_same_origin("http://127.0.0.2:99999/index.html", page)


def test_docs_spider_parse_follows_own_host() -> None:
    from example_project.spiders.docs import DocsSpider
    from scrapy.http import HtmlResponse

    spider = DocsSpider(urls="http://127.0.0.2:8000/index.html")
    body = faultsite.generate_site(PAGES)["/index.html"].body
    response = HtmlResponse("http://127.0.0.2:8000/index.html", body=body)

    output = list(spider.parse(response))
    again = list(spider.parse(response))

    items = [entry for entry in output if isinstance(entry, dict)]
    urls = [entry.url for entry in output if not isinstance(entry, dict)]
    assert items == [{"url": response.url, "title": "Generated page 0", "host": "127.0.0.2"}]
    assert "http://127.0.0.2:8000/section-1/page-1.html" in urls
    assert all(url.startswith("http://127.0.0.2:8000/") for url in urls)
    assert all("#" not in url for url in urls)
    assert len(urls) == len(set(urls))
    assert [entry for entry in again if not isinstance(entry, dict)] == []


def test_docs_spider_counts_failures() -> None:
    from example_project.spiders.docs import DocsSpider
    from scrapy.utils.test import get_crawler
    from twisted.python.failure import Failure

    crawler = get_crawler(DocsSpider)
    spider = DocsSpider.from_crawler(crawler, urls="http://127.0.0.2:8000/")
    spider.record_failure(Failure(ConnectionRefusedError()))
    spider.record_failure(Failure(ConnectionRefusedError()))

    assert crawler.stats.get_value("docs/errback/ConnectionRefusedError") == 2


def test_docs_spider_needs_a_start() -> None:
    from example_project.spiders.docs import DocsSpider

    with pytest.raises(ValueError, match="urls"):
        DocsSpider()


@pytest.mark.e2e
def test_docs_crawl_gets_reachable_pages(shared_site: RunningSite, tmp_path: Path) -> None:
    """Crawl with stock Scrapy (no add-on): the spider scrapes exactly ``reachable_pages``."""
    ready_path = tmp_path / "ready.json"
    hosts = {name: shared_site.ready["hosts"][name] for name in ("crawled", "dead")}
    ready_path.write_text(json.dumps({**shared_site.ready, "hosts": hosts}))
    items_path = tmp_path / "items.jsonl"

    command = [
        sys.executable, "-m", "scrapy", "crawl", "docs",
        "-a", f"site={ready_path}", "-O", str(items_path),
        "-s", "ADDONS={}", "-s", f"LOG_FILE={tmp_path / 'crawl.log'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE_PROJECT)}
    result = subprocess.run(
        command, cwd=EXAMPLE_PROJECT, env=env, timeout=60, check=False, capture_output=True
    )

    assert result.returncode == 0, result.stderr[-2000:]
    items = [json.loads(line) for line in items_path.read_text().splitlines()]
    paths = {urlsplit(item["url"]).path for item in items}
    assert paths == faultsite.reachable_pages("generated", pages=PAGES)
    assert len(items) == PAGES
    assert {item["host"] for item in items} == {"127.0.0.10"}
    log = (tmp_path / "crawl.log").read_text()
    assert "'docs/errback/" in log
