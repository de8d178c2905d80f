"""Validation of every RESILIENCE_* setting at start-up."""

from __future__ import annotations

import pytest
from scrapy.settings import Settings

from scrapy_resilience.core.classify import Category
from scrapy_resilience.exceptions import InvalidSettingError
from scrapy_resilience.settings import load_config

INVALID = [
    ("RESILIENCE_CIRCUIT_ENABLED", "maybe"),
    ("RESILIENCE_CIRCUIT_FAILURE_THRESHOLD", 0),
    ("RESILIENCE_CIRCUIT_FAILURE_THRESHOLD", 2.5),
    ("RESILIENCE_CIRCUIT_FAILURE_THRESHOLD", "five"),
    ("RESILIENCE_CIRCUIT_FAILURE_RATE", 0),
    ("RESILIENCE_CIRCUIT_FAILURE_RATE", 1.5),
    ("RESILIENCE_CIRCUIT_WINDOW", 0),
    ("RESILIENCE_CIRCUIT_MIN_ATTEMPTS", 21),
    ("RESILIENCE_CIRCUIT_OPEN_SECONDS", -1),
    ("RESILIENCE_CIRCUIT_OPEN_SECONDS", float("nan")),
    ("RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS", 30),
    ("RESILIENCE_CIRCUIT_OPEN_JITTER", 2),
    ("RESILIENCE_CIRCUIT_HALF_OPEN_PROBES", 0),
    ("RESILIENCE_CIRCUIT_MAX_REOPENS", 0),
    ("RESILIENCE_CIRCUIT_UNPROVEN_SHARE", 0),
    ("RESILIENCE_RETRY_ENABLED", "sometimes"),
    ("RESILIENCE_RETRY_BACKOFF_BASE", 0),
    ("RESILIENCE_RETRY_BACKOFF_FACTOR", 0.5),
    ("RESILIENCE_RETRY_BACKOFF_MAX", 0.5),
    ("RESILIENCE_RETRY_JITTER", "random"),
    ("RESILIENCE_RETRY_TIMES_BY_CATEGORY", {"network": -1}),
    ("RESILIENCE_RETRY_TIMES_BY_CATEGORY", {"dns": 3}),
    ("RESILIENCE_RETRY_TIMES_BY_CATEGORY", {"server": True}),
    ("RESILIENCE_RETRY_TIMES_BY_CATEGORY", [3, 2]),
    ("RESILIENCE_RETRY_TIMES_BY_CATEGORY", "{not json"),
    ("RESILIENCE_RETRY_AFTER_MAX", -5),
    ("RESILIENCE_RETRY_CONTENT_CHECK", 42),
    ("RESILIENCE_RETRY_CONTENT_CHECK", "no.such.module.check"),
    ("RESILIENCE_RETRY_CONTENT_CHECK", "not an identifier"),
    ("RESILIENCE_HOLD_MAX_REQUESTS", 0),
    ("RESILIENCE_HOLD_DISK_QUEUE", "no.such.Queue"),
    ("RESILIENCE_PACE_JITTER", 0.5),
    ("RESILIENCE_REGISTRY_MAX_DOMAINS", 0),
    ("RESILIENCE_THROTTLE_MAX_DELAY", 0),
    ("RESILIENCE_MEMORY_LIMIT_MB", -512),
    ("RESILIENCE_MEMORY_CHECK_INTERVAL", 0),
    ("RESILIENCE_HEALTH_INTERVAL", "often"),
    ("RESILIENCE_REPORT_FILE", 12),
    ("RESILIENCE_REPORT_FILE", "report-%(date)s.json"),
    ("RESILIENCE_REPORT_FILE", "report-100%.json"),
    # Memory guard and health monitor.
    ("RESILIENCE_MEMORY_ENABLED", "perhaps"),
    ("RESILIENCE_MEMORY_MIN_CONCURRENCY", 0),
    ("RESILIENCE_MEMORY_LOW_WATER_SHARE", 1),
    ("RESILIENCE_MEMORY_LOW_WATER_SHARE", 0),
    ("RESILIENCE_MEMORY_RESTORE_SAMPLES", 0),
    ("RESILIENCE_MEMORY_DECREASE_FACTOR", 1.0),
    ("RESILIENCE_MEMORY_DECREASE_FACTOR", "half"),
    ("RESILIENCE_MEMORY_RESTORE_STEP_SHARE", 0),
    ("RESILIENCE_MEMORY_RESTORE_STEP_SHARE", 1.5),
    ("RESILIENCE_MEMORY_HARD_LIMIT_MB", -1),
    ("RESILIENCE_MEMORY_HARD_LIMIT_MB", 256),
    ("RESILIENCE_MEMORY_CLOSE_AFTER_SECONDS", -10),
    ("RESILIENCE_MEMORY_CGROUP_SHARE", 1.2),
    ("RESILIENCE_MEMORY_MIN_AVAILABLE_MB", float("inf")),
    ("RESILIENCE_MEMORY_FULL_SCAN_INTERVAL", 0),
    ("RESILIENCE_HEALTH_ENABLED", "sure"),
    ("RESILIENCE_HEALTH_WORST_DOMAINS", -1),
    ("RESILIENCE_REPORT_MAX_HEALTHY_DOMAINS", 1.5),
    # scrapy-playwright support.
    ("RESILIENCE_PLAYWRIGHT_ENABLED", "yes please"),
    ("RESILIENCE_PLAYWRIGHT_RETRY_TIMES", -1),
    ("RESILIENCE_PLAYWRIGHT_RETRY_TIMES", 1.5),
    ("RESILIENCE_PLAYWRIGHT_CHECK_INTERVAL", 0),
    ("RESILIENCE_PLAYWRIGHT_LEAK_MIN_PAGES", 0),
    ("RESILIENCE_PLAYWRIGHT_LEAK_CHECKS", "three"),
    ("RESILIENCE_PLAYWRIGHT_RECYCLE", "when needed"),
    ("RESILIENCE_PLAYWRIGHT_RECYCLE_TIMEOUT", -1),
    ("RESILIENCE_PLAYWRIGHT_RECYCLE_MIN_INTERVAL", "hourly"),
    # Adaptive throttle.
    ("RESILIENCE_THROTTLE_MAX_DELAY", float("inf")),
    ("RESILIENCE_THROTTLE_TARGET_CONCURRENCY", 0),
    ("RESILIENCE_THROTTLE_TARGET_CONCURRENCY", "two"),
    ("RESILIENCE_THROTTLE_MIN_DELAY", -0.1),
    ("RESILIENCE_THROTTLE_START_DELAY", 0),
    ("RESILIENCE_THROTTLE_DEBUG", "verbose"),
    ("RESILIENCE_THROTTLE_BROWSER_LATENCY", 2),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_names_setting_and_value(name: str, value: object) -> None:
    with pytest.raises(InvalidSettingError) as caught:
        load_config(Settings({name: value}))
    message = str(caught.value)
    assert caught.value.setting == name
    assert name in message
    assert repr(value) in message
    assert "It must" in message


def test_defaults_are_valid() -> None:
    config = load_config(Settings())
    assert config.circuit.failure_threshold == 5
    assert config.circuit.open_seconds == 60
    assert config.circuit.open_max_seconds == 600
    assert config.circuit.half_open_probes == 1
    assert config.circuit.max_reopens == 3
    assert config.retry.backoff.base == 1.0
    assert config.retry.backoff.maximum == 60.0
    assert config.retry.backoff.jitter == "equal"
    assert config.retry.retry_after_max == 300
    assert config.throttle_max_delay == 10
    assert config.memory_limit_mb == 512
    assert config.health_interval == 30
    # Memory guard and health monitor.
    assert config.memory_check_interval == 5
    assert config.memory.min_concurrency == 1
    assert config.memory.hard_limit_mb is None
    assert config.memory.close_after_seconds is None
    assert config.memory.cgroup_share == 0.8
    assert config.report_max_healthy_domains == 1000


def test_times_by_category_merges_with_defaults() -> None:
    config = load_config(Settings({"RESILIENCE_RETRY_TIMES_BY_CATEGORY": {"server": 1}}))
    assert config.retry.times_by_category[Category.SERVER] == 1
    assert config.retry.times_by_category[Category.NETWORK] == 3
    assert config.retry.times_by_category[Category.THROTTLED] == 10


def test_times_by_category_from_json_string() -> None:
    settings = Settings({"RESILIENCE_RETRY_TIMES_BY_CATEGORY": '{"timeout": 0}'})
    assert load_config(settings).retry.times_by_category[Category.TIMEOUT] == 0


def test_strings_from_command_line_accepted() -> None:
    settings = Settings(
        {"RESILIENCE_CIRCUIT_FAILURE_THRESHOLD": "7", "RESILIENCE_CIRCUIT_ENABLED": "False"}
    )
    config = load_config(settings)
    assert config.circuit.failure_threshold == 7
    assert config.circuit_enabled is False


def test_content_check_spider_method_name_kept() -> None:
    config = load_config(Settings({"RESILIENCE_RETRY_CONTENT_CHECK": "is_real_page"}))
    assert config.retry.content_check == "is_real_page"
