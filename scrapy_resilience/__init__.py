"""scrapy-resilience: keep long Scrapy crawls alive on a flaky web.

Enable everything with ``ADDONS = {"scrapy_resilience.Addon": 500}``.
"""

from scrapy_resilience.addon import Addon
from scrapy_resilience.downloadermiddlewares.circuitbreaker import (
    AttemptObserverMiddleware,
    CircuitBreakerMiddleware,
)
from scrapy_resilience.downloadermiddlewares.retry import BackoffRetryMiddleware, get_retry_request
from scrapy_resilience.exceptions import CircuitOpenError, ContentRejectedError, InvalidSettingError
from scrapy_resilience.extensions.health import HealthMonitor
from scrapy_resilience.extensions.memory import MemoryGuard
from scrapy_resilience.extensions.throttle import AdaptiveThrottle

__version__ = "0.1.0"

__all__ = [
    "AdaptiveThrottle",
    "Addon",
    "AttemptObserverMiddleware",
    "BackoffRetryMiddleware",
    "CircuitBreakerMiddleware",
    "CircuitOpenError",
    "ContentRejectedError",
    "HealthMonitor",
    "InvalidSettingError",
    "MemoryGuard",
    "__version__",
    "get_retry_request",
]
