"""The metrics of one crawl, computed from a hand-made site log and crawl record."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.metrics import compute_metrics, dead_attempt_limit, tail_budget
from benchmarks.scenarios import HostGroup, Size

PAGES = 3
SIZE = Size(
    PAGES,
    (
        HostGroup("ok", "healthy", 1),
        HostGroup("dead", "dead", 1),
        HostGroup("limited", "rate_limited", 1, {"rate": 2.0}),
    ),
)
READY = {
    "hosts": {
        "ok1": {"url": "http://127.0.0.2:8000/"},
        "dead1": {"url": "http://127.0.0.3:8000/"},
        "limited1": {"url": "http://127.0.0.4:8000/"},
    }
}
SETTINGS = {"DOWNLOAD_TIMEOUT": 5}


def entry(
    host: str,
    arrival: float,
    *,
    status: int | None = 200,
    answered: float | None = None,
    retry_after: int | None = None,
    outcome: str = "served",
) -> dict[str, Any]:
    return {
        "host": host,
        "arrival": arrival,
        "answered": arrival + 0.01 if answered is None else answered,
        "status": status,
        "retry_after": retry_after,
        "outcome": outcome,
    }


def make_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "started": 100.0,
        "finished": 150.0,
        "cpu_opened": 1.0,
        "cpu_closed": 2.0,
        "yielded": 4,
        "callbacks": [
            [0, "http://127.0.0.2:8000/index.html", 200, 101.0],
            [1, "http://127.0.0.2:8000/section-1/page-1.html", 200, 102.0],
            [2, "http://127.0.0.2:8000/section-2/page-2.html", 200, 110.0],
        ],
        "errbacks": [],
        "sent": {"127.0.0.2": 3, "127.0.0.3": 6, "127.0.0.4": 1},
        "events": [],
        "stats": {"finish_reason": "finished"},
        "bundle_cpu_ns": None,
    }
    record.update(overrides)
    return record


def test_pages_of_reachable_hosts_only() -> None:
    metrics = compute_metrics(SIZE, READY, [], make_record(), SETTINGS)

    assert metrics["pages_available"] == 2 * PAGES
    assert metrics["pages"] == 3
    assert metrics["last_item_s"] == pytest.approx(10.0)
    assert metrics["wall_s"] == pytest.approx(50.0)
    assert metrics["throughput_pps"] == pytest.approx(3 / 50)


def test_pages_ignore_errors_and_repeats() -> None:
    callbacks = [
        [0, "http://127.0.0.2:8000/index.html", 200, 101.0],
        [0, "http://127.0.0.2:8000/index.html", 200, 102.0],
        [2, "http://127.0.0.2:8000/section-1/page-1.html", 404, 103.0],
        [3, "http://127.0.0.2:8000/missing/page-3.html", 200, 104.0],
    ]
    metrics = compute_metrics(SIZE, READY, [], make_record(callbacks=callbacks), SETTINGS)

    assert metrics["pages"] == 1
    assert metrics["duplicated"] == 1


def test_request_without_fate_is_lost() -> None:
    metrics = compute_metrics(SIZE, READY, [], make_record(), SETTINGS)

    assert metrics["yielded"] == 4
    assert metrics["lost"] == 1
    assert metrics["unfinished"] is None


def test_errback_counts_as_fate() -> None:
    errbacks = [[3, "http://127.0.0.3:8000/index.html", "CircuitOpenError", 120.0]]
    metrics = compute_metrics(SIZE, READY, [], make_record(errbacks=errbacks), SETTINGS)

    assert metrics["lost"] == 0
    assert metrics["errbacks"] == 1


def test_time_limit_makes_requests_unfinished() -> None:
    record = make_record(stats={"finish_reason": "closespider_timeout"})
    metrics = compute_metrics(SIZE, READY, [], record, SETTINGS)

    assert metrics["lost"] is None
    assert metrics["unfinished"] == 1


def test_dead_host_counted_on_client() -> None:
    log = [entry("limited1", 101.0), entry("limited1", 101.5, status=429, retry_after=1)]
    metrics = compute_metrics(SIZE, READY, log, make_record(), SETTINGS)

    assert metrics["faulty_requests_by_host"] == {"dead1": 6, "limited1": 2}
    assert metrics["faulty_requests"] == 8
    assert metrics["max_dead_attempts"] == 6


def test_gap_and_retry_after_window() -> None:
    log = [
        entry("limited1", 101.0, status=429, answered=101.0, retry_after=2),
        entry("limited1", 101.5),
        entry("limited1", 102.5),
        entry("limited1", 103.5),
        entry("ok1", 101.2),
    ]
    metrics = compute_metrics(SIZE, READY, log, make_record(), SETTINGS)

    assert metrics["rejections"] == 1
    assert metrics["min_gap_after_rejection_s"] == pytest.approx(0.5)
    assert metrics["inside_retry_after"] == 2


def test_overlapping_windows_count_once() -> None:
    log = [
        entry("limited1", 101.0, status=429, answered=101.0, retry_after=2),
        entry("limited1", 101.1, status=429, answered=101.1, retry_after=2),
        entry("limited1", 101.5),
    ]
    metrics = compute_metrics(SIZE, READY, log, make_record(), SETTINGS)

    assert metrics["inside_retry_after"] == 2


def test_client_window_starts_at_receipt() -> None:
    sent_log = [
        ["127.0.0.4", 100.0],
        ["127.0.0.4", 101.05],
        ["127.0.0.4", 101.5],
        ["127.0.0.4", 103.5],
        ["127.0.0.2", 101.5],
    ]
    # Received at 101.1 with Retry-After: 2, and a second one inside the first window.
    received = [["127.0.0.4", 101.1, 2], ["127.0.0.4", 101.2, 2]]
    record = make_record(sent_log=sent_log, rejections_received=received)
    metrics = compute_metrics(SIZE, READY, [], record, SETTINGS)

    assert metrics["sent_inside_retry_after"] == 1


def test_client_window_missing_in_old_record() -> None:
    metrics = compute_metrics(SIZE, READY, [], make_record(), SETTINGS)

    assert metrics["sent_inside_retry_after"] is None


def test_settled_rate_ratio() -> None:
    # 2 requests/s allowed. The host is crawled from 100 to 120, so the settled
    # half starts at 110, and from there it serves 1 request per second.
    log = [entry("limited1", 100.0 + second) for second in range(21)]
    metrics = compute_metrics(SIZE, READY, log, make_record(), SETTINGS)

    # Served from 110 to 120 inclusive: 11 requests in 10 s.
    assert metrics["settled_rate_ratio"] == pytest.approx(1.1 / 2)


def test_settled_window_ignores_early_rejections() -> None:
    # A burst of 429s at the start, then one rejection among the 11 requests
    # of the settled half (110 to 120).
    early = [
        entry("limited1", 100.0 + tenth / 10, status=429, outcome="rejected") for tenth in range(10)
    ]
    late = [entry("limited1", 101.0 + second) for second in range(20)]
    late[14] = entry("limited1", 115.0, status=429, outcome="rejected")
    metrics = compute_metrics(SIZE, READY, early + late, make_record(), SETTINGS)

    assert metrics["settled_rejected_share"] == pytest.approx(1 / 11)
    assert metrics["rejections"] == 11


def test_settled_rate_needs_a_window() -> None:
    log = [entry("limited1", 100.0), entry("limited1", 103.0)]
    metrics = compute_metrics(SIZE, READY, log, make_record(), SETTINGS)

    assert metrics["settled_rate_ratio"] is None
    assert metrics["settled_rejected_share"] is None


def test_tail_from_first_opening() -> None:
    events = [
        ["circuit_opened", "127.0.0.3", 120.0],
        ["circuit_opened", "127.0.0.3", 130.0],
        ["circuit_opened", "127.0.0.2", 140.0],
    ]
    metrics = compute_metrics(SIZE, READY, [], make_record(events=events), SETTINGS)

    assert metrics["tail_s"] == pytest.approx(30.0)
    assert metrics["tail_budget_s"] == pytest.approx(tail_budget(5))


def test_tail_from_last_item_without_circuits() -> None:
    metrics = compute_metrics(SIZE, READY, [], make_record(), SETTINGS)

    assert metrics["tail_s"] == pytest.approx(40.0)


def test_cpu_per_request() -> None:
    record = make_record(bundle_cpu_ns=500_000)
    metrics = compute_metrics(SIZE, READY, [], record, SETTINGS)

    assert metrics["attempts"] == 10
    assert metrics["cpu_us_per_request"] == pytest.approx(100_000)
    assert metrics["bundle_cpu_us_per_request"] == pytest.approx(50)


def test_missing_record() -> None:
    metrics = compute_metrics(SIZE, READY, [entry("ok1", 1.0)], None, SETTINGS)

    assert metrics["pages"] is None
    assert metrics["site_requests"] == 1


def test_targets_follow_bundle_defaults() -> None:
    assert dead_attempt_limit() == 6
    assert tail_budget(5) == pytest.approx(60 * 1.1 + 5 + 10)
