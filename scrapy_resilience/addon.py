"""The Scrapy add-on that enables the whole bundle with one line::

ADDONS = {"scrapy_resilience.Addon": 500}
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from scrapy.downloadermiddlewares.retry import RetryMiddleware

from scrapy_resilience.downloadermiddlewares.circuitbreaker import (
    AttemptObserverMiddleware,
    CircuitBreakerMiddleware,
)
from scrapy_resilience.downloadermiddlewares.retry import BackoffRetryMiddleware
from scrapy_resilience.exceptions import InvalidSettingError
from scrapy_resilience.extensions.health import HealthMonitor
from scrapy_resilience.extensions.memory import MemoryGuard
from scrapy_resilience.extensions.playwright import PlaywrightMonitor
from scrapy_resilience.extensions.throttle import AdaptiveThrottle
from scrapy_resilience.settings import load_config

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

logger = logging.getLogger(__name__)

#: After Scrapy's downloader OffsiteMiddleware (50), before RobotsTxtMiddleware
#: (100), so a request for an unavailable domain never waits in the downloader.
ADMISSION_PRIORITY = 75
#: Where Scrapy's RetryMiddleware sits, before MetaRefresh (580) and Redirect (600).
RETRY_PRIORITY = 550
#: Nearest the download handler, after HttpCacheMiddleware (900), so every
#: attempt that reaches the handler is seen first and exactly once.
OBSERVER_PRIORITY = 990
#: Extensions form no chain: the value only orders their construction.
EXTENSION_PRIORITY = 500


def _disable_component(settings: BaseSettings, name: str, component: type) -> None:
    """Set ``component`` to None in the ``name`` priority dict under its import path.

    Scrapy 2.13 and 2.14 merge ``DOWNLOADER_MIDDLEWARES`` with its ``_BASE``
    without matching a class key to the same class's import path, so the path,
    as the base dict spells it, is the key that disables it on every version.
    """
    components = settings.getdict(name)
    path = f"{component.__module__}.{component.__qualname__}"
    for key in list(components):
        if key is component or key == path:
            del components[key]
    components[path] = None
    settings.set(name, components, settings.getpriority(name) or 0)


class Addon:
    """Enable the circuit breaker, the backoff retry and the request hold at
    fixed priorities, in place of Scrapy's ``RetryMiddleware``, and the adaptive
    throttle, memory guard and health monitor extensions."""

    def update_settings(self, settings: BaseSettings) -> None:
        # Validate everything now, so a bad value stops the crawl before it starts.
        config = load_config(settings)
        self._check_autothrottle(settings, config.throttle_enabled)

        middlewares = "DOWNLOADER_MIDDLEWARES"
        _disable_component(settings, middlewares, RetryMiddleware)
        settings.set_in_component_priority_dict(
            middlewares, CircuitBreakerMiddleware, ADMISSION_PRIORITY
        )
        settings.set_in_component_priority_dict(middlewares, BackoffRetryMiddleware, RETRY_PRIORITY)
        settings.set_in_component_priority_dict(
            middlewares, AttemptObserverMiddleware, OBSERVER_PRIORITY
        )

        extensions = "EXTENSIONS"
        settings.set_in_component_priority_dict(extensions, MemoryGuard, EXTENSION_PRIORITY)
        settings.set_in_component_priority_dict(extensions, HealthMonitor, EXTENSION_PRIORITY)
        # scrapy-playwright support: only where scrapy-playwright is installed.
        if importlib.util.find_spec("scrapy_playwright") is not None:
            settings.set_in_component_priority_dict(
                extensions, PlaywrightMonitor, EXTENSION_PRIORITY
            )
        # Adaptive throttle.
        settings.set_in_component_priority_dict(extensions, AdaptiveThrottle, EXTENSION_PRIORITY)

        self._warn_memusage(settings, config.memory_limit_mb, config.memory_enabled)

    @staticmethod
    def _check_autothrottle(settings: BaseSettings, throttle_enabled: bool) -> None:
        if settings.getbool("AUTOTHROTTLE_ENABLED") and throttle_enabled:
            raise InvalidSettingError(
                "AUTOTHROTTLE_ENABLED",
                True,
                "Scrapy's AutoThrottle and scrapy-resilience's adaptive throttle "
                "(RESILIENCE_THROTTLE_ENABLED, on by default) would both set download delays.",
                "Remove AUTOTHROTTLE_ENABLED to let the adaptive throttle pace each domain, "
                "or set RESILIENCE_THROTTLE_ENABLED = False to keep AutoThrottle.",
            )

    @staticmethod
    def _warn_memusage(settings: BaseSettings, limit_mb: float, memory_enabled: bool) -> None:
        memusage_limit = settings.getint("MEMUSAGE_LIMIT_MB")
        if not (memory_enabled and settings.getbool("MEMUSAGE_ENABLED") and memusage_limit):
            return
        if memusage_limit <= limit_mb:
            logger.warning(
                "MEMUSAGE_LIMIT_MB (%(memusage)d) stops the crawl at or below "
                "RESILIENCE_MEMORY_LIMIT_MB (%(limit)g), before the memory guard lowers "
                "concurrency; raise MEMUSAGE_LIMIT_MB or set it to 0",
                {"memusage": memusage_limit, "limit": limit_mb},
            )


__all__ = ["Addon"]
