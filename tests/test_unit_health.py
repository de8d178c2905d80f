"""The health monitor's status line, report fields and close-time table, built on a
real runtime and registry with a fake clock and no reactor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from scrapy import Request
from scrapy.http import HtmlResponse
from scrapy.utils.test import get_crawler

from scrapy_resilience import runtime as runtime_module
from scrapy_resilience.core.classify import Category
from scrapy_resilience.downloadermiddlewares.retry import CATEGORY_KEY, COUNTS_KEY
from scrapy_resilience.extensions import health as health_module
from scrapy_resilience.extensions.health import STATUS_MESSAGE, HealthMonitor, format_table
from scrapy_resilience.extensions.memory import MemoryGuard, MemorySample
from scrapy_resilience.report import build_report
from scrapy_resilience.runtime import Attempt, Runtime, Track


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A monitor on a real runtime; ``later`` collects what would run on the reactor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]) -> None:
        self.later: list[Callable[[], None]] = []
        monkeypatch.setattr(health_module, "_call_later", self._call_later)
        self.crawler = get_crawler(
            settings_dict={
                "CONCURRENT_REQUESTS": 16,
                "RESILIENCE_CIRCUIT_OPEN_JITTER": 0,
                **settings,
            }
        )
        self.clock = FakeClock()
        self.runtime = Runtime(self.crawler, clock=self.clock)
        setattr(self.crawler, runtime_module._ATTRIBUTE, self.runtime)
        monkeypatch.setattr(self.runtime, "wake_at", lambda when: None)
        self.crawler.engine = SimpleNamespace(  # type: ignore[assignment]
            downloader=SimpleNamespace(total_concurrency=8)
        )
        self.monitor = HealthMonitor(self.crawler)
        self.spider = self.crawler._create_spider()

    def _call_later(self, delay: float, function: Callable[[], None]) -> Any:
        self.later.append(function)
        return SimpleNamespace(active=lambda: True, cancel=lambda: None)

    def run_later(self) -> None:
        calls, self.later = self.later, []
        for call in calls:
            call()

    def open_circuit(self, key: str) -> None:
        state = self.runtime.domain(key)
        for _ in range(5):
            self.runtime.registry.start_attempt(state, probe=False)
            self.runtime.registry.record_failure(
                state, Category.NETWORK, self.clock.now, probe=False
            )

    def succeed(self, key: str, times: int = 1) -> None:
        state = self.runtime.domain(key)
        for _ in range(times):
            self.runtime.registry.start_attempt(state, probe=False)
            self.runtime.registry.record_success(state, self.clock.now, probe=False)

    def attempt(
        self,
        key: str,
        category: Category | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Request:
        # Record the attempt in the registry first, as the observer does.
        state = self.runtime.domain(key)
        registry = self.runtime.registry
        registry.start_attempt(state, probe=False)
        if category is None:
            registry.record_success(state, self.clock.now, probe=False)
        else:
            registry.record_failure(state, category, self.clock.now, probe=False)

        request = Request(f"http://{key}/page", meta=meta or {})
        response = None
        if category is not Category.NETWORK:
            status = 503 if category is Category.SERVER else 200
            response = HtmlResponse(request.url, status=status, request=request)
        self.monitor.on_attempt(Attempt(Track(key, True), request, category, response=response))
        return request


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Setup]:
    def make(**settings: Any) -> Setup:
        return Setup(monkeypatch, settings)

    return make


# The status line


def test_status_line_one_delayed_domain(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.runtime.domain("slow.test").floor_delay = 1.0
    s.runtime.domain("fast.test")

    assert s.monitor.status()["delay"] == "1.00 s on 1 domain"


def test_status_line_fields(setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture) -> None:
    s = setup()
    for key in ("d.test", "b.test", "a.test", "c.test"):
        s.open_circuit(key)
    s.open_circuit("h.test")
    s.runtime.registry.poll(s.runtime.domain("h.test"), s.clock.now + 1000)
    s.runtime.registry.give_up(s.runtime.domain("g.test"), "never answered")
    s.runtime.domain("slow.test").floor_delay = 0.5
    s.runtime.domain("slower.test").throttle_delay = 2.0
    for reason in ("retry", "retry", "open"):
        s.runtime.hold.add(Request("http://a.test/x"), "a.test", s.clock.now + 5, reason)

    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.health")
    s.monitor.log_status(s.spider)

    records = [r for r in caplog.records if r.name == "scrapy_resilience.extensions.health"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.INFO
    assert record.msg == STATUS_MESSAGE
    args = record.args
    assert isinstance(args, dict)
    assert args["open"] == 4
    assert args["open_domains"] == " (a.test, b.test, c.test and 1 more)"
    assert args["half_open"] == 1
    assert args["half_open_domains"] == " (h.test)"
    assert args["given_up"] == 1
    assert args["held"] == 3
    assert args["retries"] == 2
    assert args["delay"] == "0.50 to 2.00 s on 2 domains"
    assert args["memory"] == "not guarded"
    assert args["concurrency"] == 8
    assert args["max_concurrency"] == 16
    assert record.getMessage() == (
        "Resilience: 4 circuits open (a.test, b.test, c.test and 1 more), 1 half-open "
        "(h.test), 1 domains given up; 3 requests held (2 retries); delay 0.50 to 2.00 s "
        "on 2 domains; memory not guarded; concurrency 8 of 16"
    )


def test_status_line_quiet_crawl(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.succeed("ok.test")
    status = s.monitor.status()
    assert status["open"] == 0
    assert status["open_domains"] == ""
    assert status["half_open_domains"] == ""
    assert status["held"] == 0
    assert status["retries"] == 0
    assert status["delay"] == "none"


def test_status_line_reads_memory_guard(setup: Callable[..., Setup]) -> None:
    s = setup(RESILIENCE_MEMORY_LIMIT_MB=300)
    guard = MemoryGuard(s.crawler, cgroup_limit=lambda: None)
    s.crawler.extensions.middlewares = (*s.crawler.extensions.middlewares, guard)
    assert s.monitor.status()["memory"] == "not measured yet, limit 300 MB"

    guard.last_sample = MemorySample(123.4, 200.0, True, 3, None, 0.01)
    assert s.monitor.status()["memory"] == "123 of 300 MB"


def test_retries_pending_follow_hold(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.runtime.hold.add(Request("http://a.test/1"), "a.test", s.clock.now, "retry")
    s.runtime.hold.add(Request("http://a.test/2"), "a.test", s.clock.now, "paced")
    assert s.monitor.status()["retries"] == 1
    assert len(s.runtime.hold.drain_entries()) == 2
    assert s.monitor.status()["retries"] == 0
    assert s.monitor.status()["held"] == 0


# Report fields


def test_report_fields_per_domain(setup: Callable[..., Setup]) -> None:
    s = setup()
    for _ in range(3):
        s.attempt("ok.test")
    s.attempt("ok.test", meta={COUNTS_KEY: {"attempts": 2}})

    request = s.attempt("flaky.test", Category.SERVER, meta={"retry_times": 2})
    request.meta[CATEGORY_KEY] = "server"
    s.attempt("flaky.test", Category.NETWORK)
    s.run_later()

    s.clock.now = 110.0
    s.open_circuit("down.test")
    s.clock.now = 125.0
    state = s.runtime.domain("down.test")
    s.runtime.registry.poll(state, s.clock.now + 100)
    s.runtime.registry.start_attempt(state, probe=True)
    s.runtime.registry.record_success(state, s.clock.now, probe=True)

    s.clock.now = 130.0
    s.open_circuit("dead.test")
    s.runtime.domain("dead.test").rejected = 4
    s.clock.now = 140.0

    report = build_report(s.runtime, s.spider, "finished")
    domains = report["domains"]

    ok = domains["ok.test"]
    assert ok["attempts"] == 4
    assert ok["responses"] == 4
    assert ok["retries"] == 1
    assert ok["open_seconds"] == 0.0
    assert ok["requests_given_up"] == {}

    flaky = domains["flaky.test"]
    assert flaky["attempts"] == 2
    assert flaky["failures"] == {"server": 1, "network": 1}
    assert flaky["responses"] == 1
    assert flaky["retries"] == 1
    assert flaky["requests_given_up"] == {"server": 1}

    assert domains["down.test"]["open_seconds"] == 15.0
    assert domains["down.test"]["circuit_opened"] == 1
    assert domains["down.test"]["state"] == "closed"
    dead = domains["dead.test"]
    assert dead["open_seconds"] == 10.0
    assert dead["requests_given_up"] == {"circuit_open": 4}
    assert report["healthy_domains_omitted"] == {"domains": 0, "attempts": 0}


def test_open_time_stops_when_given_up(setup: Callable[..., Setup]) -> None:
    s = setup()
    s.open_circuit("dead.test")
    s.clock.now += 7.0
    s.runtime.registry.give_up(s.runtime.domain("dead.test"), "never answered")
    s.clock.now += 50.0

    report = build_report(s.runtime, s.spider, "finished")
    assert report["domains"]["dead.test"]["open_seconds"] == 7.0
    assert report["domains"]["dead.test"]["given_up"] is True


def test_report_bounds_healthy_domains(setup: Callable[..., Setup]) -> None:
    s = setup(RESILIENCE_REPORT_MAX_HEALTHY_DOMAINS=2)
    for index in range(1, 6):
        s.succeed(f"ok{index}.test", times=index)
    s.open_circuit("bad1.test")
    s.open_circuit("bad2.test")

    report = build_report(s.runtime, s.spider, "finished")
    assert set(report["domains"]) == {"ok5.test", "ok4.test", "bad1.test", "bad2.test"}
    assert report["healthy_domains_omitted"] == {"domains": 3, "attempts": 6}


def test_retry_exhaustion_checked_after_chain(setup: Callable[..., Setup]) -> None:
    s = setup()
    retried = s.attempt("flaky.test", Category.SERVER)
    exhausted = s.attempt("flaky.test", Category.SERVER)
    assert len(s.later) == 1
    exhausted.meta[CATEGORY_KEY] = "server"
    assert CATEGORY_KEY not in retried.meta
    s.run_later()
    assert s.monitor.domains["flaky.test"].requests_given_up == {"server": 1}


# The table at close


def test_close_table_lists_worst_domains(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup(RESILIENCE_HEALTH_WORST_DOMAINS=2)
    s.succeed("ok.test", times=2)
    s.open_circuit("down.test")
    s.open_circuit("dead.test")
    s.runtime.registry.give_up(s.runtime.domain("dead.test"), "never answered")
    state = s.runtime.domain("slightly.test")
    s.runtime.registry.start_attempt(state, probe=False)
    s.runtime.registry.record_failure(state, Category.TIMEOUT, s.clock.now, probe=False)

    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.health")
    s.monitor.spider_closed(s.spider, "finished")

    messages = [r.getMessage() for r in caplog.records if r.name.endswith("health")]
    assert len(messages) == 1
    lines = messages[0].splitlines()
    assert lines[0] == "Resilience: 3 of 4 domains had failures; the worst 2:"
    assert lines[1].split()[:4] == ["domain", "state", "attempts", "responses"]
    assert lines[2].startswith("dead.test")
    assert "given up" in lines[2]
    assert "network 5" in lines[2]
    assert "domain: never answered" in lines[2]
    assert lines[3].startswith("down.test")
    assert len(lines) == 4


def test_close_table_all_healthy(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup()
    s.succeed("ok.test")
    s.succeed("fine.test")
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.health")
    s.monitor.log_table(s.spider)
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("health")]
    assert messages == ["Resilience: all 2 domains were healthy"]


def test_close_line_one_healthy_domain(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = setup()
    s.succeed("ok.test")
    caplog.set_level(logging.INFO, logger="scrapy_resilience.extensions.health")
    s.monitor.log_table(s.spider)
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("health")]
    assert messages == ["Resilience: the only domain was healthy"]


def test_table_shows_latency_from_extenders() -> None:
    row = {
        "domain": "a.test",
        "state": "closed",
        "given_up": False,
        "give_up_reason": None,
        "attempts": 3,
        "responses": 2,
        "retries": 1,
        "circuit_opened": 0,
        "open_seconds": 0.0,
        "failures": {"timeout": 1},
        "rejected": 0,
        "requests_given_up": {"timeout": 1},
        "latency_p95": 1.234,
    }
    line = format_table([row]).splitlines()[1]
    assert "1.23" in line
    assert "timeout 1" in line
    assert "requests: timeout 1" in line


def test_monitor_off_raises_not_configured() -> None:
    from scrapy.exceptions import NotConfigured

    crawler = get_crawler(settings_dict={"RESILIENCE_HEALTH_ENABLED": False})
    with pytest.raises(NotConfigured):
        HealthMonitor(crawler)
