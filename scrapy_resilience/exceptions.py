"""Exceptions raised by scrapy-resilience."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy.exceptions import IgnoreRequest

if TYPE_CHECKING:
    from scrapy.http import Response


class CircuitOpenError(IgnoreRequest):
    """Reaches the errback of a request whose domain stayed unavailable.

    It subclasses :exc:`~scrapy.exceptions.IgnoreRequest`, so Scrapy does not
    log it at ERROR for every request; the bundle logs one line per domain it
    gives up.
    """

    def __init__(self, domain: str, reason: str = "", *args: Any) -> None:
        self.domain = domain
        self.reason = reason
        message = f"Domain {domain!r} is unavailable"
        if reason:
            message = f"{message}: {reason}"
        super().__init__(message, *args)


class ContentRejectedError(IgnoreRequest):
    """Reaches the errback of a request whose responses the content check kept
    rejecting; :attr:`response` is the last rejected response."""

    def __init__(self, response: Response, reason: str = "rejected by the content check") -> None:
        self.response = response
        self.reason = reason
        super().__init__(f"{reason}: {response.status} {response.url}")


class InvalidSettingError(ValueError):
    """Raised at start-up for a setting value the bundle cannot use.

    The message names the setting, the value and what is allowed.
    """

    def __init__(self, name: str, value: object, allowed: str, fix: str | None = None) -> None:
        self.setting = name
        self.value = value
        self.allowed = allowed
        if fix is None:
            fix = f"Fix {name} in your settings or remove it to use the default."
        super().__init__(f"Invalid value for {name}: {value!r}. {allowed} {fix}")
