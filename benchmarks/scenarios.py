"""The benchmark scenarios: which hosts the fault site serves and what is crawled.

Every host serves the same generated site of ``pages`` pages. The spider starts
with the URL of every page of every host, interleaved (page 0 of each host, then
page 1, ...), so the scheduler's queue mixes hosts from the start. It also follows
same-origin links, which adds the site's links to missing pages (404s). A host is
reachable unless its profile is ``dead`` or ``blackhole``; every page of a
reachable host is expected.

Each scenario has a full size (the documented figures) and a quick size (a smoke
run). The fault scenarios keep their host counts and page counts in quick mode,
because their duration comes from timers (the bundle's circuit open time, the
blackhole's download timeout, AutoThrottle's start delay) rather than from their
size. For the same reason they run twice per profile in full mode rather than
three times, which keeps the full mode near 40 minutes on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from faultsite.content import generated_path

#: Healthy hosts respond after 20 to 100 ms, picked per page.
HEALTHY_LATENCY = [0.02, 0.1]

#: Allowed rate of the rate-limited hosts, in requests per second.
RATE_LIMIT = 4.0

UNREACHABLE_PROFILES = frozenset({"dead", "blackhole"})


@dataclass(frozen=True)
class HostGroup:
    """``count`` hosts of one profile, named ``<prefix>1`` and up.

    Virtual hosts are named ``h00001.test`` and up and share the site's listener
    at 127.0.0.1; the others get their own address from 127.0.0.2 up.
    """

    prefix: str
    profile: str
    count: int
    options: dict[str, Any] = field(default_factory=dict)
    virtual: bool = False


@dataclass(frozen=True)
class Size:
    """The pages per host and the hosts of one scenario in one mode."""

    pages: int
    groups: tuple[HostGroup, ...]


@dataclass(frozen=True)
class Scenario:
    """A benchmark scenario; ``pending`` names what it waits for, or is None."""

    name: str
    summary: str
    full: Size
    quick: Size
    #: Crawl time limit in seconds, the same for every profile. Scrapy closes the
    #: spider when it is reached (``CLOSESPIDER_TIMEOUT``) and the record is still
    #: written. It cuts profiles that would crawl on for much longer, such as
    #: AutoThrottle against a dead host, which waits its start delay of 5 s before
    #: each attempt.
    time_limit: float
    #: Settings added to every profile's settings.
    settings: dict[str, Any] = field(default_factory=dict)
    #: Runs per profile in full mode (quick mode runs each once).
    full_repeat: int = 3
    #: Memory each callback keeps, in KiB, for ``retain_seconds`` (0: until the end).
    retain_kb: int = 0
    retain_seconds: float = 0.0
    measure_registry: bool = False
    #: A memory limit in MB given to every profile: the memory guard's for the
    #: bundle, Scrapy's MemoryUsage (``MEMUSAGE_LIMIT_MB``) for stock profiles.
    memory_limit_mb: int = 0
    pending: str | None = None

    def size(self, quick: bool) -> Size:
        return self.quick if quick else self.full


def _healthy(count: int, prefix: str = "ok") -> HostGroup:
    return HostGroup(prefix, "healthy", count, {"latency": HEALTHY_LATENCY})


_DEAD = HostGroup("dead", "dead", 1)
_BLACKHOLE = HostGroup("hole", "blackhole", 1)


def _flaky(count: int) -> HostGroup:
    return HostGroup("flaky", "flaky", count, {"rate": 0.4, "latency": HEALTHY_LATENCY})


def _limited(count: int) -> HostGroup:
    options = {"rate": RATE_LIMIT, "burst": 4, "retry_after": 2, "latency": HEALTHY_LATENCY}
    return HostGroup("limited", "rate_limited", count, options)


def _recovering(count: int) -> HostGroup:
    options = {"fail_seconds": 20, "fail_mode": "refuse", "latency": HEALTHY_LATENCY}
    return HostGroup("back", "recovering", count, options)


_DEAD_HOST = Size(30, (_healthy(20), _DEAD, _BLACKHOLE))
_FLAKY = Size(40, (_healthy(6), _flaky(4)))
_RATE_LIMIT = Size(150, (_limited(3),))
_RECOVERING = Size(30, (_healthy(4), _recovering(2)))
_MIXED = Size(30, (_healthy(10), _DEAD, _BLACKHOLE, _flaky(2), _limited(2), _recovering(2)))

SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "dead-host",
            "20 healthy hosts, one dead and one blackhole host, 30 pages each",
            _DEAD_HOST,
            _DEAD_HOST,
            time_limit=120,
            full_repeat=2,
        ),
        Scenario(
            "flaky",
            "6 healthy hosts and 4 answering 503 to 40% of attempts, 40 pages each",
            _FLAKY,
            _FLAKY,
            time_limit=120,
        ),
        Scenario(
            "rate-limit",
            f"3 hosts allowing {RATE_LIMIT:g} requests/s (burst 4), else 429 with "
            "Retry-After: 2, 150 pages each",
            _RATE_LIMIT,
            _RATE_LIMIT,
            time_limit=120,
        ),
        Scenario(
            "recovering",
            "4 healthy hosts and 2 refusing connections for their first 20 s, 30 pages each",
            _RECOVERING,
            _RECOVERING,
            time_limit=120,
            full_repeat=2,
        ),
        Scenario(
            "mixed",
            "10 healthy, 1 dead, 1 blackhole, 2 flaky, 2 rate-limited and 2 recovering "
            "hosts, 30 pages each",
            _MIXED,
            _MIXED,
            time_limit=120,
            full_repeat=2,
        ),
        Scenario(
            "healthy-overhead",
            "32 healthy hosts with no faults (100 pages each; 60 in quick mode)",
            Size(100, (_healthy(32),)),
            Size(60, (_healthy(32),)),
            time_limit=300,
        ),
        Scenario(
            "memory",
            "8 healthy hosts whose callbacks each keep 1 MiB for 10 s, against a 256 MB limit",
            Size(200, (_healthy(8),)),
            Size(60, (_healthy(8),)),
            time_limit=300,
            retain_kb=1024,
            retain_seconds=10,
            # Memory kept for a while after each callback grows with the crawl rate,
            # so lowering concurrency lowers it, as with large responses or pages
            # rendered by a browser.
            memory_limit_mb=256,
        ),
        Scenario(
            "scale",
            "10,000 virtual hosts (h00001.test ...) with 2 pages each (2,000 hosts in quick mode)",
            Size(2, (HostGroup("h", "healthy", 10_000, virtual=True),)),
            Size(2, (HostGroup("h", "healthy", 2_000, virtual=True),)),
            time_limit=600,
            # One run of 20,000 requests already averages the per-request and
            # per-domain figures, and a second would cost 6 of the 40 minutes.
            full_repeat=1,
            measure_registry=True,
        ),
    )
}


@dataclass(frozen=True)
class Host:
    """One host of a built site: its config name, profile and options."""

    name: str
    profile: str
    options: dict[str, Any]

    @property
    def reachable(self) -> bool:
        return self.profile not in UNREACHABLE_PROFILES

    @property
    def faulty(self) -> bool:
        return self.profile != "healthy"


def build_hosts(size: Size) -> list[Host]:
    """Return the hosts of a scenario size, in config order."""
    hosts = []
    for group in size.groups:
        for number in range(1, group.count + 1):
            hosts.append(Host(f"{group.prefix}{number}", group.profile, dict(group.options)))
    return hosts


def site_config(size: Size, seed: int = 1) -> dict[str, Any]:
    """Return the fault site config (as for ``start_site``) of a scenario size."""
    hosts: list[dict[str, Any]] = []
    for group in size.groups:
        for number in range(1, group.count + 1):
            entry: dict[str, Any] = {
                "name": f"{group.prefix}{number}",
                "profile": group.profile,
                **group.options,
            }
            if group.virtual:
                entry["hostname"] = f"h{number:05d}.test"
            hosts.append(entry)
    return {"seed": seed, "root": "generated", "pages": size.pages, "js_pages": 1, "hosts": hosts}


def page_paths(size: Size) -> list[str]:
    """Return the URL paths of every page of one host, index first."""
    return [generated_path(number) for number in range(size.pages)]


def start_urls(size: Size, base_urls: dict[str, str]) -> list[str]:
    """Return every page URL of every host, interleaved by page number.

    ``base_urls`` maps host names to base URLs (``RunningSite.urls``).
    """
    names = [host.name for host in build_hosts(size)]
    return [base_urls[name] + path.lstrip("/") for path in page_paths(size) for name in names]
