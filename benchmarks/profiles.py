"""The Scrapy settings each benchmark profile crawls with.

Every profile crawls with the same spider, the same concurrency and the same pins
(``DOWNLOAD_TIMEOUT`` 5, ``ROBOTSTXT_OBEY`` off), confined to loopback by the
example project's guard and resolving names with :mod:`benchmarks.resolver`.
"""

from __future__ import annotations

from typing import Any

from scrapy.settings import default_settings

RESOLVER = "benchmarks.resolver.LoopbackResolver"

#: The setting that names the resolver class: Scrapy 2.19 reads
#: TWISTED_DNS_RESOLVER and warns that DNS_RESOLVER is deprecated, while 2.13
#: to 2.18 read only DNS_RESOLVER.
RESOLVER_SETTING = (
    "TWISTED_DNS_RESOLVER" if hasattr(default_settings, "TWISTED_DNS_RESOLVER") else "DNS_RESOLVER"
)

#: Settings shared by every profile.
COMMON_SETTINGS: dict[str, Any] = {
    "DOWNLOAD_TIMEOUT": 5,
    "ROBOTSTXT_OBEY": False,
    # Scrapy's defaults, pinned so every profile and Scrapy release compares alike.
    "CONCURRENT_REQUESTS": 16,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 8,
    "DOWNLOAD_DELAY": 0,
    "DOWNLOADER_MIDDLEWARES": {"example_project.middlewares.LoopbackGuardMiddleware": 10},
    # Names under .test resolve to the fault site's virtual-host listener.
    "LOOPBACK_GUARD_ALLOWED_HOSTS": ["*.test"],
    RESOLVER_SETTING: RESOLVER,
    # DEBUG logs a line per request, which would dominate the CPU figures.
    "LOG_LEVEL": "INFO",
    "TELNETCONSOLE_ENABLED": False,
}

BUNDLE_ADDON = {"scrapy_resilience.Addon": 500}

#: Settings of each profile on top of COMMON_SETTINGS.
PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    "stock": {},
    "stock-autothrottle": {"AUTOTHROTTLE_ENABLED": True},
    "bundle": {"ADDONS": BUNDLE_ADDON},
    # Isolates the adaptive throttle's effect once it lands: run it with
    # `--profile bundle-no-throttle` beside `bundle`.
    "bundle-no-throttle": {"ADDONS": BUNDLE_ADDON, "RESILIENCE_THROTTLE_ENABLED": False},
}

#: Profiles run when none is named on the command line, in this order.
DEFAULT_PROFILES = ("stock", "stock-autothrottle", "bundle")

#: The profile every ratio is computed against.
BASELINE = "stock"


def is_bundle(profile: str) -> bool:
    """Return whether a profile enables the bundle's add-on."""
    return "ADDONS" in PROFILE_SETTINGS[profile]


def settings_for(
    profile: str, extra: dict[str, Any] | None = None, memory_limit_mb: int = 0
) -> dict[str, Any]:
    """Return the full settings of ``profile``, with a scenario's ``extra`` on top.

    A ``memory_limit_mb`` goes to the memory guard in bundle profiles and to
    Scrapy's MemoryUsage in stock ones, both checked every half second, so each
    side acts on the same limit as early as it can.
    """
    settings = {**COMMON_SETTINGS, **PROFILE_SETTINGS[profile], **(extra or {})}
    if memory_limit_mb and is_bundle(profile):
        settings["RESILIENCE_MEMORY_LIMIT_MB"] = memory_limit_mb
        settings["RESILIENCE_MEMORY_CHECK_INTERVAL"] = 0.5
        settings["RESILIENCE_MEMORY_FULL_SCAN_INTERVAL"] = 1
    elif memory_limit_mb:
        settings["MEMUSAGE_LIMIT_MB"] = memory_limit_mb
        settings["MEMUSAGE_CHECK_INTERVAL_SECONDS"] = 0.5
    return settings
