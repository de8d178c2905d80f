"""Default values of the ``RESILIENCE_*`` settings and their validation.

Every setting is read and checked once, at start-up, into a frozen
:class:`Config`. An invalid value raises
:exc:`~scrapy_resilience.exceptions.InvalidSettingError` (a ``ValueError``)
naming the setting, the value and what is allowed, which stops the crawl
before anything is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from scrapy.utils.misc import load_object

from scrapy_resilience.core.backoff import JITTER_MODES, Backoff
from scrapy_resilience.core.circuit import CircuitConfig
from scrapy_resilience.core.classify import Category
from scrapy_resilience.core.throttle import ThrottleRules
from scrapy_resilience.exceptions import InvalidSettingError

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

DEFAULT_TIMES_BY_CATEGORY: dict[str, int] = {
    Category.NETWORK.value: 3,
    Category.TIMEOUT.value: 2,
    Category.SERVER.value: 5,
    Category.CONTENT.value: 2,
    Category.THROTTLED.value: 10,
}

#: Defaults of every ``RESILIENCE_*`` setting; the add-on does not copy them
#: into the crawler's settings, components read them through :class:`Config`.
DEFAULTS: dict[str, Any] = {
    "RESILIENCE_CIRCUIT_ENABLED": True,
    "RESILIENCE_CIRCUIT_FAILURE_THRESHOLD": 5,
    "RESILIENCE_CIRCUIT_FAILURE_RATE": 0.8,
    "RESILIENCE_CIRCUIT_WINDOW": 20,
    "RESILIENCE_CIRCUIT_MIN_ATTEMPTS": 10,
    "RESILIENCE_CIRCUIT_OPEN_SECONDS": 60.0,
    "RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS": 600.0,
    "RESILIENCE_CIRCUIT_OPEN_JITTER": 0.1,
    "RESILIENCE_CIRCUIT_HALF_OPEN_PROBES": 1,
    "RESILIENCE_CIRCUIT_MAX_REOPENS": 3,
    "RESILIENCE_CIRCUIT_UNPROVEN_SHARE": 0.5,
    "RESILIENCE_RETRY_ENABLED": True,
    "RESILIENCE_RETRY_BACKOFF_BASE": 1.0,
    "RESILIENCE_RETRY_BACKOFF_FACTOR": 2.0,
    "RESILIENCE_RETRY_BACKOFF_MAX": 60.0,
    "RESILIENCE_RETRY_JITTER": "equal",
    "RESILIENCE_RETRY_TIMES_BY_CATEGORY": {},
    "RESILIENCE_RETRY_AFTER_MAX": 300.0,
    "RESILIENCE_RETRY_CONTENT_CHECK": None,
    "RESILIENCE_HOLD_MAX_REQUESTS": 10_000,
    "RESILIENCE_HOLD_DISK_QUEUE": "scrapy.squeues.PickleFifoDiskQueue",
    "RESILIENCE_PACE_JITTER": 0.1,
    "RESILIENCE_REGISTRY_MAX_DOMAINS": 100_000,
    "RESILIENCE_THROTTLE_ENABLED": True,
    "RESILIENCE_THROTTLE_MAX_DELAY": 10.0,
    "RESILIENCE_MEMORY_ENABLED": True,
    "RESILIENCE_MEMORY_LIMIT_MB": 512,
    "RESILIENCE_MEMORY_CHECK_INTERVAL": 5.0,
    "RESILIENCE_HEALTH_ENABLED": True,
    "RESILIENCE_HEALTH_INTERVAL": 30.0,
    "RESILIENCE_REPORT_FILE": None,
    # Memory guard and health monitor.
    "RESILIENCE_MEMORY_MIN_CONCURRENCY": 1,
    "RESILIENCE_MEMORY_LOW_WATER_SHARE": 0.8,
    "RESILIENCE_MEMORY_RESTORE_SAMPLES": 3,
    "RESILIENCE_MEMORY_DECREASE_FACTOR": 0.5,
    "RESILIENCE_MEMORY_RESTORE_STEP_SHARE": 0.125,
    "RESILIENCE_MEMORY_HARD_LIMIT_MB": 0,
    "RESILIENCE_MEMORY_CLOSE_AFTER_SECONDS": 0,
    "RESILIENCE_MEMORY_CGROUP_SHARE": 0.8,
    "RESILIENCE_MEMORY_MIN_AVAILABLE_MB": 0,
    "RESILIENCE_MEMORY_FULL_SCAN_INTERVAL": 30.0,
    "RESILIENCE_HEALTH_WORST_DOMAINS": 10,
    "RESILIENCE_REPORT_MAX_HEALTHY_DOMAINS": 1000,
    # scrapy-playwright support.
    "RESILIENCE_PLAYWRIGHT_ENABLED": True,
    "RESILIENCE_PLAYWRIGHT_RETRY_TIMES": 2,
    "RESILIENCE_PLAYWRIGHT_CHECK_INTERVAL": 5.0,
    "RESILIENCE_PLAYWRIGHT_LEAK_MIN_PAGES": 3,
    "RESILIENCE_PLAYWRIGHT_LEAK_CHECKS": 3,
    "RESILIENCE_PLAYWRIGHT_RECYCLE": False,
    "RESILIENCE_PLAYWRIGHT_RECYCLE_TIMEOUT": 60.0,
    "RESILIENCE_PLAYWRIGHT_RECYCLE_MIN_INTERVAL": 60.0,
    # Adaptive throttle.
    "RESILIENCE_THROTTLE_TARGET_CONCURRENCY": 1.0,
    "RESILIENCE_THROTTLE_MIN_DELAY": 0.5,
    "RESILIENCE_THROTTLE_START_DELAY": 1.0,
    "RESILIENCE_THROTTLE_DEBUG": False,
    "RESILIENCE_THROTTLE_BROWSER_LATENCY": True,
}


def get(settings: BaseSettings, name: str) -> Any:
    """Return the value of ``name`` from ``settings``, or its default."""
    value = settings.get(name)
    return DEFAULTS[name] if value is None else value


def get_bool(settings: BaseSettings, name: str) -> bool:
    """Return a boolean setting, accepting what Scrapy's ``getbool`` accepts."""
    value = get(settings, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise InvalidSettingError(name, value, "It must be True or False.")


def get_int(settings: BaseSettings, name: str, minimum: int, maximum: int | None = None) -> int:
    """Return an integer setting within ``[minimum, maximum]``."""
    value = get(settings, name)
    allowed = f"It must be a whole number of at least {minimum}" + (
        f" and at most {maximum}." if maximum is not None else "."
    )
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (isinstance(value, float) and not value.is_integer()):
        raise InvalidSettingError(name, value, allowed)
    if number < minimum or (maximum is not None and number > maximum):
        raise InvalidSettingError(name, value, allowed)
    return number


def get_float(
    settings: BaseSettings,
    name: str,
    minimum: float,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
) -> float:
    """Return a finite number setting within the given bounds."""
    value = get(settings, name)
    low = f"above {minimum:g}" if exclusive_minimum else f"at least {minimum:g}"
    high = f" and at most {maximum:g}" if maximum is not None else ""
    allowed = f"It must be a number {low}{high}."
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    too_low = number <= minimum if exclusive_minimum else number < minimum
    if not math.isfinite(number) or too_low or (maximum is not None and number > maximum):
        raise InvalidSettingError(name, value, allowed)
    return number


def _times_by_category(settings: BaseSettings) -> dict[Category, int]:
    name = "RESILIENCE_RETRY_TIMES_BY_CATEGORY"
    value = get(settings, name)
    if hasattr(value, "copy_to_dict"):
        value = value.copy_to_dict()
    if isinstance(value, str):
        # From the command line: -s 'RESILIENCE_RETRY_TIMES_BY_CATEGORY={"server": 1}'
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    categories = ", ".join(DEFAULT_TIMES_BY_CATEGORY)
    allowed = (
        f"It must be a dict mapping categories ({categories}) to whole numbers of "
        "at least 0; categories left out keep their defaults "
        f"{DEFAULT_TIMES_BY_CATEGORY}."
    )
    if not isinstance(value, Mapping):
        raise InvalidSettingError(name, value, allowed)

    merged = dict(DEFAULT_TIMES_BY_CATEGORY)
    for key, times in value.items():
        if key not in merged or isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise InvalidSettingError(name, value, allowed)
        merged[key] = times
    return {Category(key): times for key, times in merged.items()}


ContentCheck = Callable[..., Any]


def _content_check(settings: BaseSettings) -> ContentCheck | str | None:
    """Return the content check: a callable, a spider method name or None.

    A string without a dot names a spider method, resolved when the spider is
    open; a dotted string is an import path, loaded now.
    """
    name = "RESILIENCE_RETRY_CONTENT_CHECK"
    value = get(settings, name)
    allowed = (
        "It must be None, a callable taking (response, spider) or (response), "
        "the import path of one, or the name of a spider method."
    )
    if value is None or callable(value):
        return cast(ContentCheck | None, value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidSettingError(name, value, allowed)
    if "." not in value:
        if not value.isidentifier():
            raise InvalidSettingError(name, value, allowed)
        return value
    try:
        loaded = load_object(value)
    except (ImportError, NameError, ValueError, AttributeError) as error:
        raise InvalidSettingError(name, value, f"{allowed} Import failed: {error}.") from error
    if not callable(loaded):
        raise InvalidSettingError(name, value, allowed)
    return cast(ContentCheck, loaded)


def _jitter_mode(settings: BaseSettings) -> str:
    name = "RESILIENCE_RETRY_JITTER"
    value = get(settings, name)
    if value not in JITTER_MODES:
        raise InvalidSettingError(
            name, value, f"It must be one of {', '.join(map(repr, JITTER_MODES))}."
        )
    return str(value)


def _optional_path(settings: BaseSettings, name: str) -> str | None:
    value = get(settings, name)
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise InvalidSettingError(name, value, "It must be None or a file path.")


def _report_file(settings: BaseSettings) -> str | None:
    name = "RESILIENCE_REPORT_FILE"
    path = _optional_path(settings, name)
    if path is None:
        return None
    try:
        path % {"name": "", "spider": "", "time": "", "job": ""}
    except (KeyError, ValueError, TypeError) as error:
        raise InvalidSettingError(
            name,
            path,
            "It must be a file path whose only placeholders are %(name)s, %(spider)s, "
            f"%(time)s and %(job)s (write %% for a literal percent sign): {error!r}.",
        ) from error
    return path


def _import_path(settings: BaseSettings, name: str) -> type[Any]:
    value = get(settings, name)
    try:
        loaded = load_object(value) if isinstance(value, str) else value
    except (ImportError, NameError, ValueError, AttributeError) as error:
        raise InvalidSettingError(
            name, value, f"It must be an importable class. Import failed: {error}."
        ) from error
    if not isinstance(loaded, type):
        raise InvalidSettingError(name, value, "It must be a class or the import path of one.")
    return loaded


@dataclass(frozen=True)
class RetryConfig:
    """Retry settings of the bundle, read from ``RESILIENCE_RETRY_*``."""

    enabled: bool
    backoff: Backoff
    times_by_category: dict[Category, int]
    retry_after_max: float
    content_check: ContentCheck | str | None


@dataclass(frozen=True)
class MemoryConfig:
    """Memory guard settings beyond the limit and the interval, read from
    ``RESILIENCE_MEMORY_*``; MB and seconds, None for a switched-off option."""

    min_concurrency: int
    low_water_share: float
    restore_samples: int
    decrease_factor: float
    restore_step_share: float
    hard_limit_mb: float | None
    close_after_seconds: float | None
    cgroup_share: float
    min_available_mb: float
    full_scan_interval: float


def _memory_config(settings: BaseSettings) -> MemoryConfig:
    limit_mb = get_float(settings, "RESILIENCE_MEMORY_LIMIT_MB", 0, exclusive_minimum=True)
    hard_limit_mb = get_float(settings, "RESILIENCE_MEMORY_HARD_LIMIT_MB", 0)
    if 0 < hard_limit_mb < limit_mb:
        raise InvalidSettingError(
            "RESILIENCE_MEMORY_HARD_LIMIT_MB",
            get(settings, "RESILIENCE_MEMORY_HARD_LIMIT_MB"),
            f"It must be 0 (off) or at least RESILIENCE_MEMORY_LIMIT_MB ({limit_mb:g}).",
        )
    close_after = get_float(settings, "RESILIENCE_MEMORY_CLOSE_AFTER_SECONDS", 0)
    return MemoryConfig(
        min_concurrency=get_int(settings, "RESILIENCE_MEMORY_MIN_CONCURRENCY", 1),
        low_water_share=_share_below_one(settings, "RESILIENCE_MEMORY_LOW_WATER_SHARE"),
        restore_samples=get_int(settings, "RESILIENCE_MEMORY_RESTORE_SAMPLES", 1),
        decrease_factor=_share_below_one(settings, "RESILIENCE_MEMORY_DECREASE_FACTOR"),
        restore_step_share=get_float(
            settings, "RESILIENCE_MEMORY_RESTORE_STEP_SHARE", 0, 1, exclusive_minimum=True
        ),
        hard_limit_mb=hard_limit_mb or None,
        close_after_seconds=close_after or None,
        cgroup_share=get_float(settings, "RESILIENCE_MEMORY_CGROUP_SHARE", 0, 1),
        min_available_mb=get_float(settings, "RESILIENCE_MEMORY_MIN_AVAILABLE_MB", 0),
        full_scan_interval=get_float(
            settings, "RESILIENCE_MEMORY_FULL_SCAN_INTERVAL", 0, exclusive_minimum=True
        ),
    )


def _share_below_one(settings: BaseSettings, name: str) -> float:
    allowed = "It must be a number above 0 and below 1."
    try:
        share = get_float(settings, name, 0, 1, exclusive_minimum=True)
    except InvalidSettingError as error:
        raise InvalidSettingError(name, error.value, allowed) from None
    if share >= 1:
        raise InvalidSettingError(name, get(settings, name), allowed)
    return share


@dataclass(frozen=True)
class PlaywrightConfig:
    """scrapy-playwright support, read from ``RESILIENCE_PLAYWRIGHT_*``.

    ``retry_times`` bounds the retries of a request whose browser page crashed
    or closed. A page leak is reported when open pages exceed the requests in
    flight through the browser by ``leak_min_pages`` or more on
    ``leak_checks`` checks in a row, made every ``check_interval`` seconds.
    With ``recycle``, a leak, or memory above the limit at the memory guard's
    minimum concurrency (at most once per ``recycle_min_interval`` seconds),
    also closes the browser once nothing is in flight, waiting at most
    ``recycle_timeout`` seconds for that.
    """

    enabled: bool
    retry_times: int
    check_interval: float
    leak_min_pages: int
    leak_checks: int
    recycle: bool
    recycle_timeout: float
    recycle_min_interval: float


def _playwright_config(settings: BaseSettings) -> PlaywrightConfig:
    return PlaywrightConfig(
        enabled=get_bool(settings, "RESILIENCE_PLAYWRIGHT_ENABLED"),
        retry_times=get_int(settings, "RESILIENCE_PLAYWRIGHT_RETRY_TIMES", 0),
        check_interval=get_float(
            settings, "RESILIENCE_PLAYWRIGHT_CHECK_INTERVAL", 0, exclusive_minimum=True
        ),
        leak_min_pages=get_int(settings, "RESILIENCE_PLAYWRIGHT_LEAK_MIN_PAGES", 1),
        leak_checks=get_int(settings, "RESILIENCE_PLAYWRIGHT_LEAK_CHECKS", 1),
        recycle=get_bool(settings, "RESILIENCE_PLAYWRIGHT_RECYCLE"),
        recycle_timeout=get_float(
            settings, "RESILIENCE_PLAYWRIGHT_RECYCLE_TIMEOUT", 0, exclusive_minimum=True
        ),
        recycle_min_interval=get_float(settings, "RESILIENCE_PLAYWRIGHT_RECYCLE_MIN_INTERVAL", 0),
    )


@dataclass(frozen=True)
class ThrottleConfig:
    """Adaptive throttle settings, read from ``RESILIENCE_THROTTLE_*``.

    ``rules`` contains the numbers of the delay rules. ``debug`` logs each
    adjustment at INFO, and ``browser_latency`` lets the latency of attempts
    rendered by scrapy-playwright enter the latency rule.
    """

    rules: ThrottleRules
    debug: bool
    browser_latency: bool


def _throttle_config(settings: BaseSettings) -> ThrottleConfig:
    rules = ThrottleRules(
        target_concurrency=get_float(
            settings, "RESILIENCE_THROTTLE_TARGET_CONCURRENCY", 0, exclusive_minimum=True
        ),
        min_delay=get_float(settings, "RESILIENCE_THROTTLE_MIN_DELAY", 0),
        start_delay=get_float(
            settings, "RESILIENCE_THROTTLE_START_DELAY", 0, exclusive_minimum=True
        ),
        max_delay=get_float(settings, "RESILIENCE_THROTTLE_MAX_DELAY", 0, exclusive_minimum=True),
    )
    return ThrottleConfig(
        rules=rules,
        debug=get_bool(settings, "RESILIENCE_THROTTLE_DEBUG"),
        browser_latency=get_bool(settings, "RESILIENCE_THROTTLE_BROWSER_LATENCY"),
    )


@dataclass(frozen=True)
class Config:
    """Every ``RESILIENCE_*`` setting, validated."""

    circuit_enabled: bool
    circuit: CircuitConfig
    unproven_share: float
    retry: RetryConfig
    hold_max_requests: int
    hold_disk_queue: type[Any]
    pace_jitter: float
    registry_max_domains: int
    throttle_enabled: bool
    throttle_max_delay: float
    memory_enabled: bool
    memory_limit_mb: float
    memory_check_interval: float
    health_enabled: bool
    health_interval: float
    report_file: str | None
    # Memory guard and health monitor.
    memory: MemoryConfig
    health_worst_domains: int
    report_max_healthy_domains: int
    # scrapy-playwright support.
    playwright: PlaywrightConfig
    # Adaptive throttle.
    throttle: ThrottleConfig


def _circuit_config(settings: BaseSettings) -> CircuitConfig:
    open_seconds = get_float(settings, "RESILIENCE_CIRCUIT_OPEN_SECONDS", 0, exclusive_minimum=True)
    open_max = get_float(settings, "RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS", 0, exclusive_minimum=True)
    if open_max < open_seconds:
        raise InvalidSettingError(
            "RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS",
            get(settings, "RESILIENCE_CIRCUIT_OPEN_MAX_SECONDS"),
            f"It must be at least RESILIENCE_CIRCUIT_OPEN_SECONDS ({open_seconds:g}).",
        )
    window = get_int(settings, "RESILIENCE_CIRCUIT_WINDOW", 1)
    return CircuitConfig(
        failure_threshold=get_int(settings, "RESILIENCE_CIRCUIT_FAILURE_THRESHOLD", 1),
        failure_rate=get_float(
            settings, "RESILIENCE_CIRCUIT_FAILURE_RATE", 0, 1, exclusive_minimum=True
        ),
        window=window,
        min_attempts=get_int(settings, "RESILIENCE_CIRCUIT_MIN_ATTEMPTS", 1, window),
        open_seconds=open_seconds,
        open_max_seconds=open_max,
        open_jitter=get_float(settings, "RESILIENCE_CIRCUIT_OPEN_JITTER", 0, 1),
        half_open_probes=get_int(settings, "RESILIENCE_CIRCUIT_HALF_OPEN_PROBES", 1),
        max_reopens=get_int(settings, "RESILIENCE_CIRCUIT_MAX_REOPENS", 1),
    )


def _retry_config(settings: BaseSettings) -> RetryConfig:
    base = get_float(settings, "RESILIENCE_RETRY_BACKOFF_BASE", 0, exclusive_minimum=True)
    maximum = get_float(settings, "RESILIENCE_RETRY_BACKOFF_MAX", 0, exclusive_minimum=True)
    if maximum < base:
        raise InvalidSettingError(
            "RESILIENCE_RETRY_BACKOFF_MAX",
            get(settings, "RESILIENCE_RETRY_BACKOFF_MAX"),
            f"It must be at least RESILIENCE_RETRY_BACKOFF_BASE ({base:g}).",
        )
    backoff = Backoff(
        base=base,
        factor=get_float(settings, "RESILIENCE_RETRY_BACKOFF_FACTOR", 1),
        maximum=maximum,
        jitter=_jitter_mode(settings),
    )
    return RetryConfig(
        enabled=get_bool(settings, "RESILIENCE_RETRY_ENABLED"),
        backoff=backoff,
        times_by_category=_times_by_category(settings),
        retry_after_max=get_float(settings, "RESILIENCE_RETRY_AFTER_MAX", 0),
        content_check=_content_check(settings),
    )


def load_config(settings: BaseSettings) -> Config:
    """Read and validate every ``RESILIENCE_*`` setting.

    Raises :exc:`InvalidSettingError` on the first invalid value.
    """
    return Config(
        circuit_enabled=get_bool(settings, "RESILIENCE_CIRCUIT_ENABLED"),
        circuit=_circuit_config(settings),
        unproven_share=get_float(
            settings, "RESILIENCE_CIRCUIT_UNPROVEN_SHARE", 0, 1, exclusive_minimum=True
        ),
        retry=_retry_config(settings),
        hold_max_requests=get_int(settings, "RESILIENCE_HOLD_MAX_REQUESTS", 1),
        hold_disk_queue=_import_path(settings, "RESILIENCE_HOLD_DISK_QUEUE"),
        pace_jitter=get_float(settings, "RESILIENCE_PACE_JITTER", 0, 0.1),
        registry_max_domains=get_int(settings, "RESILIENCE_REGISTRY_MAX_DOMAINS", 1),
        throttle_enabled=get_bool(settings, "RESILIENCE_THROTTLE_ENABLED"),
        throttle_max_delay=get_float(
            settings, "RESILIENCE_THROTTLE_MAX_DELAY", 0, exclusive_minimum=True
        ),
        memory_enabled=get_bool(settings, "RESILIENCE_MEMORY_ENABLED"),
        memory_limit_mb=get_float(
            settings, "RESILIENCE_MEMORY_LIMIT_MB", 0, exclusive_minimum=True
        ),
        memory_check_interval=get_float(
            settings, "RESILIENCE_MEMORY_CHECK_INTERVAL", 0, exclusive_minimum=True
        ),
        health_enabled=get_bool(settings, "RESILIENCE_HEALTH_ENABLED"),
        health_interval=get_float(
            settings, "RESILIENCE_HEALTH_INTERVAL", 0, exclusive_minimum=True
        ),
        report_file=_report_file(settings),
        # Memory guard and health monitor.
        memory=_memory_config(settings),
        health_worst_domains=get_int(settings, "RESILIENCE_HEALTH_WORST_DOMAINS", 0),
        report_max_healthy_domains=get_int(settings, "RESILIENCE_REPORT_MAX_HEALTHY_DOMAINS", 0),
        # scrapy-playwright support.
        playwright=_playwright_config(settings),
        # Adaptive throttle.
        throttle=_throttle_config(settings),
    )
