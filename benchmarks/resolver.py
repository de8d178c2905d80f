"""A DNS resolver for benchmark crawls that never queries real DNS.

Scrapy loads its resolver class from ``TWISTED_DNS_RESOLVER`` (Scrapy 2.19) or
``DNS_RESOLVER`` (2.13 to 2.18); :data:`benchmarks.profiles.RESOLVER_SETTING`
names the one the installed Scrapy reads, set to
``"benchmarks.resolver.LoopbackResolver"``. The class follows the interface of
``scrapy.resolver.CachingThreadedResolver``: ``from_crawler(crawler, reactor)``,
``install_on_reactor()`` and ``getHostByName(name, timeout)``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from zope.interface import implementer  # type: ignore[import-untyped]

#: The address every name under an allowed suffix resolves to: the fault site's
#: listener for virtual hosts.
DEFAULT_ADDRESS = "127.0.0.1"

#: Name suffixes resolved to ``DEFAULT_ADDRESS`` unless ``LOOPBACK_RESOLVER_SUFFIXES``
#: is set. ``.test`` is reserved for testing (RFC 2606), so no real host has it.
DEFAULT_SUFFIXES = (".test",)


def _is_loopback_literal(name: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


@implementer(IResolverSimple)
class LoopbackResolver:
    """Resolve names to loopback addresses from a fixed table; fail every other name.

    ``LOOPBACK_RESOLVER_MAP`` maps exact names to addresses (for a virtual host
    whose name must be refused, such as a dead one), and names ending in one of
    ``LOOPBACK_RESOLVER_SUFFIXES`` resolve to 127.0.0.1. A loopback IP literal
    resolves to itself. Any other name fails with ``DNSLookupError``, and no
    address outside 127.0.0.0/8 is ever returned.
    """

    def __init__(
        self,
        reactor: Any,
        names: Mapping[str, str] | None = None,
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    ) -> None:
        self.reactor = reactor
        self.names = {name.lower(): address for name, address in (names or {}).items()}
        self.suffixes = tuple(suffix.lower() for suffix in suffixes)
        for name, address in self.names.items():
            if not _is_loopback_literal(address):
                raise ValueError(
                    f"LOOPBACK_RESOLVER_MAP maps {name!r} to {address!r}, which is not a "
                    "loopback address; use one in 127.0.0.0/8"
                )

    @classmethod
    def from_crawler(cls, crawler: Any, reactor: Any) -> LoopbackResolver:
        """Build the resolver from ``LOOPBACK_RESOLVER_MAP`` and ``..._SUFFIXES``."""
        settings = crawler.settings
        suffixes = settings.getlist("LOOPBACK_RESOLVER_SUFFIXES") or list(DEFAULT_SUFFIXES)
        return cls(reactor, settings.getdict("LOOPBACK_RESOLVER_MAP"), suffixes)

    def install_on_reactor(self) -> None:
        """Make the reactor resolve every name through this resolver."""
        self.reactor.installResolver(self)

    def resolve(self, name: str) -> str | None:
        """Return the loopback address for ``name``, or None when it is not served."""
        name = name.lower().rstrip(".")
        if name in self.names:
            return self.names[name]
        if _is_loopback_literal(name):
            return name.strip("[]")
        if any(name.endswith(suffix) for suffix in self.suffixes):
            return DEFAULT_ADDRESS
        return None

    def getHostByName(self, name: str, timeout: Sequence[int] = ()) -> defer.Deferred[str]:
        """Return a Deferred firing with the address, or failing with DNSLookupError.

        The camel-case name is fixed by ``IResolverSimple``. ``timeout`` is ignored,
        because nothing is looked up.
        """
        address = self.resolve(name)
        if address is None:
            return defer.fail(DNSLookupError(f"{name!r} is not a benchmark host"))
        return defer.succeed(address)
