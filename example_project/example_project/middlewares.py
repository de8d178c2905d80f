"""Downloader middlewares of the example project."""

from __future__ import annotations

import fnmatch
import ipaddress
import logging

from scrapy import Request, Spider
from scrapy.crawler import Crawler
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.utils.httpobj import urlparse_cached

logger = logging.getLogger(__name__)

# Each dropped host is logged once. Beyond this many distinct hosts, drops are only
# counted, so a page that links to millions of hosts cannot make the set grow.
_MAX_LOGGED_HOSTS = 10_000


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` is a loopback IP literal: 127.0.0.0/8 or ::1.

    Names are never resolved, so ``localhost`` is not loopback here unless listed.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LoopbackGuardMiddleware:
    """Drop every request whose host is not on loopback, before anything is sent.

    A host passes when it is a loopback IP literal (127.0.0.0/8 or ::1) or matches
    a pattern of ``LOOPBACK_GUARD_ALLOWED_HOSTS`` (fnmatch, case-insensitive, such as
    ``*.test`` for names a test resolver maps to loopback). Any other request gets
    ``IgnoreRequest``; each dropped host is logged once at INFO, and every drop
    counts in the ``loopback_guard/dropped`` stat. Set ``LOOPBACK_GUARD_ENABLED`` to
    False to switch it off. Place it first, at priority 10.
    """

    def __init__(self, crawler: Crawler) -> None:
        settings = crawler.settings
        if not settings.getbool("LOOPBACK_GUARD_ENABLED", True):
            raise NotConfigured

        patterns = settings.getlist("LOOPBACK_GUARD_ALLOWED_HOSTS")
        self.allowed_patterns = [pattern.strip().lower() for pattern in patterns if pattern.strip()]
        self.stats = crawler.stats
        self._logged_hosts: set[str] = set()

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> LoopbackGuardMiddleware:
        """Build the middleware for a crawler."""
        return cls(crawler)

    def is_allowed(self, host: str) -> bool:
        """Return whether requests to ``host`` (a hostname or IP literal) may be sent."""
        host = host.lower()
        if is_loopback_host(host):
            return True
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allowed_patterns)

    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        """Raise IgnoreRequest for a request to a host that is not allowed."""
        host = urlparse_cached(request).hostname or ""
        if self.is_allowed(host):
            return None

        if self.stats is not None:
            self.stats.inc_value("loopback_guard/dropped")
        if host not in self._logged_hosts and len(self._logged_hosts) < _MAX_LOGGED_HOSTS:
            self._logged_hosts.add(host)
            logger.info(
                "Dropped a request to %(host)r: not a loopback host (%(url)s)",
                {"host": host, "url": request.url},
            )
        raise IgnoreRequest(f"host {host!r} is not a loopback host")
