"""The add-on's wiring of components, checked on the merged settings Scrapy builds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from scrapy.settings import Settings
from scrapy.utils.conf import build_component_list

from scrapy_resilience import (
    Addon,
    AttemptObserverMiddleware,
    BackoffRetryMiddleware,
    CircuitBreakerMiddleware,
    InvalidSettingError,
)


def enabled_middlewares(settings: Settings) -> list[object]:
    name = "DOWNLOADER_MIDDLEWARES"
    if hasattr(settings, "get_component_priority_dict_with_base"):
        merged = settings.get_component_priority_dict_with_base(name)
    else:  # Scrapy 2.13
        merged = settings.getwithbase(name)
    return build_component_list(merged)


def test_addon_replaces_retry_middleware() -> None:
    settings = Settings()
    Addon().update_settings(settings)
    enabled = [
        item if isinstance(item, str) else f"{item.__module__}.{item.__qualname__}"
        for item in enabled_middlewares(settings)
    ]
    assert "scrapy.downloadermiddlewares.retry.RetryMiddleware" not in enabled
    ours = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in (CircuitBreakerMiddleware, BackoffRetryMiddleware, AttemptObserverMiddleware)
    ]
    positions = [enabled.index(path) for path in ours]
    robots = enabled.index("scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware")
    offsite = enabled.index("scrapy.downloadermiddlewares.offsite.OffsiteMiddleware")
    assert offsite < positions[0] < robots
    assert enabled[-1] == ours[2]


def test_addon_disables_retry_given_as_class() -> None:
    from scrapy.downloadermiddlewares.retry import RetryMiddleware

    settings = Settings({"DOWNLOADER_MIDDLEWARES": {RetryMiddleware: 550}})
    Addon().update_settings(settings)
    assert RetryMiddleware not in enabled_middlewares(settings)
    assert "scrapy.downloadermiddlewares.retry.RetryMiddleware" not in enabled_middlewares(settings)


def test_addon_rejects_autothrottle() -> None:
    with pytest.raises(InvalidSettingError, match="RESILIENCE_THROTTLE_ENABLED = False"):
        Addon().update_settings(Settings({"AUTOTHROTTLE_ENABLED": True}))


def test_addon_allows_autothrottle_without_throttle() -> None:
    settings = Settings({"AUTOTHROTTLE_ENABLED": True, "RESILIENCE_THROTTLE_ENABLED": False})
    Addon().update_settings(settings)


def test_addon_warns_when_memusage_limit_is_lower(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings({"MEMUSAGE_ENABLED": True, "MEMUSAGE_LIMIT_MB": 400})
    Addon().update_settings(settings)
    assert "MEMUSAGE_LIMIT_MB (400)" in caplog.text


@pytest.mark.parametrize(
    ("setting", "component"),
    [
        ("RESILIENCE_CIRCUIT_ENABLED", CircuitBreakerMiddleware),
        ("RESILIENCE_RETRY_ENABLED", BackoffRetryMiddleware),
    ],
)
def test_disabled_component_not_configured(setting: str, component: type) -> None:
    from scrapy.exceptions import NotConfigured

    # The switch is read before anything else, so settings alone are enough.
    crawler = SimpleNamespace(settings=Settings({setting: False}))
    with pytest.raises(NotConfigured):
        component.from_crawler(crawler)
