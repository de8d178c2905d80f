"""The benchmark resolver maps test names to loopback and fails every other name."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import DNSLookupError
from twisted.python.failure import Failure

from benchmarks.resolver import LoopbackResolver


class FakeReactor:
    def __init__(self) -> None:
        self.installed: Any = None

    # Named as in Twisted's IReactorPluggableResolver.
    def installResolver(self, resolver: Any) -> None:
        self.installed = resolver


def result_of(resolver: LoopbackResolver, name: str) -> Any:
    outcome: list[Any] = []
    resolver.getHostByName(name).addBoth(outcome.append)
    return outcome[0]


def test_test_names_resolve_to_listener() -> None:
    resolver = LoopbackResolver(FakeReactor())

    assert result_of(resolver, "h00001.test") == "127.0.0.1"
    assert result_of(resolver, "H00002.TEST.") == "127.0.0.1"


def test_loopback_literals_resolve_to_themselves() -> None:
    resolver = LoopbackResolver(FakeReactor())

    assert result_of(resolver, "127.0.0.7") == "127.0.0.7"
    assert result_of(resolver, "[::1]") == "::1"


def test_map_overrides_suffix() -> None:
    resolver = LoopbackResolver(FakeReactor(), {"dead.test": "127.255.255.254"})

    assert result_of(resolver, "dead.test") == "127.255.255.254"


@pytest.mark.parametrize("name", ["example.com", "10.0.0.1", "169.254.169.254", "test"])
def test_other_names_fail(name: str) -> None:
    resolver = LoopbackResolver(FakeReactor())

    outcome = result_of(resolver, name)

    assert isinstance(outcome, Failure)
    assert isinstance(outcome.value, DNSLookupError)


def test_map_rejects_outside_address() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        LoopbackResolver(FakeReactor(), {"a.test": "192.0.2.1"})


def test_installs_on_reactor() -> None:
    reactor = FakeReactor()
    resolver = LoopbackResolver(reactor)

    resolver.install_on_reactor()

    assert reactor.installed is resolver


def test_from_crawler_reads_settings() -> None:
    from scrapy.utils.test import get_crawler

    crawler = get_crawler(
        settings_dict={
            "LOOPBACK_RESOLVER_MAP": {"gone.test": "127.255.255.254"},
            "LOOPBACK_RESOLVER_SUFFIXES": [".bench"],
        }
    )
    resolver = LoopbackResolver.from_crawler(crawler, FakeReactor())

    assert result_of(resolver, "gone.test") == "127.255.255.254"
    assert result_of(resolver, "a.bench") == "127.0.0.1"
    assert isinstance(result_of(resolver, "a.test"), Failure)
