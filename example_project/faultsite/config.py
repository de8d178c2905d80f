"""Site configuration: parsing, defaults and validation.

A config is a JSON object such as::

    {"seed": 1, "root": null, "port": 0,
     "hosts": [{"name": "healthy1", "address": "127.0.0.2", "profile": "healthy"},
               {"name": "v1", "hostname": "h1.test", "profile": "flaky", "rate": 0.4}]}

Site keys: ``seed`` (1), ``root`` (the Python docs if installed, else
``"generated"``), ``pages`` (200, for the generated site), ``js_pages`` (10),
``port`` (0: pick one), ``dead_address`` and ``hosts``. A host has a ``name``, a
``profile``, and an ``address`` in 127.0.0.0/8 (assigned from 127.0.0.2 up when
missing), or a ``hostname`` served by ``Host`` header at 127.0.0.1. Options, with
defaults (every profile also takes ``latency``, ``latency_schedule`` and
``robots_txt``):

- ``flaky``: ``rate`` 0.3 (the fraction of attempts that get a 503), ``retry_after`` null;
- ``rate_limited``: ``rate`` 5 (tokens per second), ``burst`` 5, ``retry_after`` 1,
  ``retry_after_mode`` ``"seconds"`` or ``"http-date"``, ``penalize_rejected``
  false, ``ratelimit_headers`` false;
- ``recovering``: ``fail_seconds`` 10, ``fail_mode`` ``"refuse"`` or ``"503"``,
  ``fail_until_file`` (when set, the failure lasts until that file exists instead
  of ``fail_seconds``, so a test can end it at a known moment),
  ``retry_after`` null;
- ``ban`` and ``reset``: ``rate`` 1.0; ``reset`` also takes ``reset_delay`` 0 (a
  stall in seconds before the reset);
- ``healthy``, ``dead`` and ``blackhole``: none.

``latency`` is seconds, or ``[minimum, maximum]`` for a per-page pick in that
range. ``latency_schedule`` changes it during a run: a list of
``[count, latency]`` steps with increasing counts, where each step applies to
the requests that follow the host's first ``count`` requests, so
``[[0, 0.01], [30, 0.5], [60, 0.01]]`` answers requests 31 to 60 in 0.5 s and
the others in 0.01 s. Counting requests rather than seconds keeps a run
repeatable however fast the client is.

Every error is a ``ConfigError`` whose message names the host and the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultsite.content import DOCS_ROOT, GENERATED

PROFILES = (
    "healthy",
    "dead",
    "blackhole",
    "flaky",
    "rate_limited",
    "recovering",
    "ban",
    "reset",
)

#: The address of the listener shared by virtual hosts.
VIRTUAL_ADDRESS = "127.0.0.1"

#: Default address for the names of dead virtual hosts. A test resolver maps those
#: names here, and nothing listens here, so connections are refused.
DEFAULT_DEAD_ADDRESS = "127.255.255.254"

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LABEL_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_SITE_KEYS = ("seed", "root", "port", "pages", "js_pages", "dead_address", "hosts")
_PLACEMENT_KEYS = ("name", "profile", "address", "hostname", "port")


class ConfigError(ValueError):
    """An invalid site config. The message names the host and key at fault."""


Validator = Callable[[str, str, Any], Any]


def _fail(where: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: invalid {key!r}: {value!r} ({expected})")


def _is_number(value: Any) -> bool:
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_real and math.isfinite(value)


def _fraction(where: str, key: str, value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise _fail(where, key, value, "expected a number from 0 to 1")
    return float(value)


def _positive(where: str, key: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise _fail(where, key, value, "expected a number above 0")
    return float(value)


def _non_negative(where: str, key: str, value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise _fail(where, key, value, "expected a number of seconds, 0 or more")
    return float(value)


def _positive_int(where: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(where, key, value, "expected an integer, 1 or more")
    return value


def _seconds_int(where: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(where, key, value, "expected whole seconds, 0 or more")
    return value


def _optional_seconds_int(where: str, key: str, value: Any) -> int | None:
    return None if value is None else _seconds_int(where, key, value)


def _boolean(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, key, value, "expected true or false")
    return value


def _choice(*options: str) -> Validator:
    def validate(where: str, key: str, value: Any) -> str:
        if value not in options:
            raise _fail(where, key, value, "expected one of " + ", ".join(options))
        return str(value)

    return validate


def _latency(where: str, key: str, value: Any) -> tuple[float, float]:
    if _is_number(value) and value >= 0:
        return (float(value), float(value))

    is_pair = isinstance(value, (list, tuple)) and len(value) == 2
    if is_pair and all(_is_number(bound) for bound in value):
        low, high = value
        if 0 <= low <= high:
            return (float(low), float(high))
    raise _fail(
        where, key, value, "expected seconds, or [minimum, maximum] with 0 <= minimum <= maximum"
    )


def _latency_schedule(
    where: str, key: str, value: Any
) -> tuple[tuple[int, tuple[float, float]], ...]:
    expected = (
        "expected a list of [count, latency] steps with whole counts of 0 or more in "
        "increasing order, and latencies in seconds or [minimum, maximum]"
    )
    if not isinstance(value, (list, tuple)):
        raise _fail(where, key, value, expected)
    steps: list[tuple[int, tuple[float, float]]] = []
    for step in value:
        if not (isinstance(step, (list, tuple)) and len(step) == 2):
            raise _fail(where, key, value, expected)
        count, latency = step
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise _fail(where, key, value, expected)
        if steps and count <= steps[-1][0]:
            raise _fail(where, key, value, expected)
        try:
            steps.append((count, _latency(where, key, latency)))
        except ConfigError:
            raise _fail(where, key, value, expected) from None
    return tuple(steps)


def _optional_text(where: str, key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _fail(where, key, value, "expected a string or null")
    return value


def _redirects(where: str, key: str, value: Any) -> tuple[tuple[str, str], ...]:
    expected = "expected an object mapping paths that start with / to target paths or URLs"
    if not isinstance(value, Mapping):
        raise _fail(where, key, value, expected)
    pairs = []
    for source, target in value.items():
        if not (isinstance(source, str) and source.startswith("/") and isinstance(target, str)):
            raise _fail(where, key, value, expected)
        pairs.append((source, target))
    return tuple(pairs)


# Options each profile accepts, with defaults. Keys shared by all profiles are in
# _COMMON_OPTIONS. "rate" is a fraction of attempts for flaky, ban and reset, and
# tokens per second for rate_limited.
_PROFILE_OPTIONS: dict[str, dict[str, tuple[Any, Validator]]] = {
    "healthy": {},
    "dead": {},
    "blackhole": {},
    "flaky": {
        "rate": (0.3, _fraction),
        "retry_after": (None, _optional_seconds_int),
    },
    "rate_limited": {
        "rate": (5.0, _positive),
        "burst": (5, _positive_int),
        "retry_after": (1, _seconds_int),
        "retry_after_mode": ("seconds", _choice("seconds", "http-date")),
        "penalize_rejected": (False, _boolean),
        "ratelimit_headers": (False, _boolean),
    },
    "recovering": {
        "fail_seconds": (10.0, _non_negative),
        "fail_mode": ("refuse", _choice("refuse", "503")),
        "fail_until_file": (None, _optional_text),
        "retry_after": (None, _optional_seconds_int),
    },
    "ban": {"rate": (1.0, _fraction)},
    "reset": {
        "rate": (1.0, _fraction),
        "reset_delay": (0.0, _non_negative),
    },
}

_COMMON_OPTIONS: dict[str, tuple[Any, Validator]] = {
    "latency": ((0.0, 0.0), _latency),
    "latency_schedule": ((), _latency_schedule),
    "robots_txt": (None, _optional_text),
    "redirects": ((), _redirects),
}


@dataclass(frozen=True)
class HostConfig:
    """One host of the site, with every option of its profile filled in.

    Exactly one of ``address`` (its own listener) and ``hostname`` (a virtual host on
    the shared listener, chosen by the ``Host`` header) is set. Options that the
    profile does not use keep their zero values.
    """

    name: str
    profile: str
    address: str | None = None
    hostname: str | None = None
    port: int | None = None
    latency: tuple[float, float] = (0.0, 0.0)
    latency_schedule: tuple[tuple[int, tuple[float, float]], ...] = ()
    robots_txt: str | None = None
    rate: float = 0.0
    burst: int = 0
    retry_after: int | None = None
    retry_after_mode: str = "seconds"
    penalize_rejected: bool = False
    ratelimit_headers: bool = False
    fail_seconds: float = 0.0
    fail_mode: str = "refuse"
    fail_until_file: str | None = None
    reset_delay: float = 0.0
    redirects: tuple[tuple[str, str], ...] = ()

    @property
    def is_virtual(self) -> bool:
        """Whether the host is served by ``Host`` header on the shared listener."""
        return self.hostname is not None


@dataclass(frozen=True)
class SiteConfig:
    """A validated site: content, seed, ports and hosts.

    ``root`` is a directory path or ``"generated"``. ``port`` 0 means one port picked
    at start that is free on every address the site uses.
    """

    seed: int
    root: str
    pages: int
    js_pages: int
    port: int
    dead_address: str
    hosts: tuple[HostConfig, ...]

    @property
    def needs_virtual_listener(self) -> bool:
        """Whether any host is served by the shared listener at 127.0.0.1."""
        return any(host.is_virtual and host.profile != "dead" for host in self.hosts)


def load_config(path: Path) -> dict[str, Any]:
    """Read a JSON config file, raising ConfigError when it is missing or invalid."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from error

    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must contain a JSON object")
    return raw


def parse_config(raw: Mapping[str, Any]) -> SiteConfig:
    """Validate a config object and return it with every default filled in."""
    unknown = sorted(set(raw) - set(_SITE_KEYS))
    if unknown:
        raise ConfigError(f"site: unknown key {unknown[0]!r} (allowed: {', '.join(_SITE_KEYS)})")

    seed = raw.get("seed", 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail("site", "seed", seed, "expected an integer")
    port = _port("site", raw.get("port", 0), allow_zero=True)
    pages = _positive_int("site", "pages", raw.get("pages", 200))
    js_pages = _positive_int("site", "js_pages", raw.get("js_pages", 10))
    root = _root(raw.get("root"))
    dead_address = _loopback_address(
        "site", "dead_address", raw.get("dead_address", DEFAULT_DEAD_ADDRESS)
    )

    raw_hosts = raw.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ConfigError("site: 'hosts' must be a non-empty list of host objects")
    hosts = _parse_hosts(raw_hosts, dead_address)

    return SiteConfig(
        seed=seed,
        root=root,
        pages=pages,
        js_pages=js_pages,
        port=port,
        dead_address=dead_address,
        hosts=hosts,
    )


def _root(value: Any) -> str:
    if value is None:
        return str(DOCS_ROOT) if DOCS_ROOT.is_dir() else GENERATED
    if not isinstance(value, str):
        raise _fail("site", "root", value, f"expected a directory path, {GENERATED!r} or null")
    if value == GENERATED:
        return value
    if not Path(value).is_dir():
        raise ConfigError(f"site: invalid 'root': directory not found: {value!r}")
    return value


def _port(where: str, value: Any, allow_zero: bool) -> int:
    lowest = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= 65535:
        raise _fail(where, "port", value, f"expected an integer from {lowest} to 65535")
    return value


def _loopback_address(where: str, key: str, value: Any) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise _fail(where, key, value, "expected an IPv4 address in 127.0.0.0/8") from None
    if not address.is_loopback or str(address) in ("127.0.0.0", "127.255.255.255"):
        raise _fail(where, key, value, "expected an IPv4 address in 127.0.0.0/8")
    return str(address)


def _parse_hosts(raw_hosts: list[Any], dead_address: str) -> tuple[HostConfig, ...]:
    hosts: list[HostConfig] = []
    names: set[str] = set()
    addresses: set[str] = set()
    hostnames: set[str] = set()

    for index, raw_host in enumerate(raw_hosts):
        host = _parse_host(index, raw_host)
        where = f"host {host.name!r}"
        if host.address == dead_address:
            raise ConfigError(
                f"{where}: 'address' {dead_address!r} is the site's 'dead_address', "
                "where nothing may listen"
            )
        if host.name in names:
            raise ConfigError(f"{where}: duplicate 'name'")
        if host.address is not None and host.address in addresses:
            raise ConfigError(f"{where}: duplicate 'address' {host.address!r}")
        if host.hostname is not None and host.hostname in hostnames:
            raise ConfigError(f"{where}: duplicate 'hostname' {host.hostname!r}")
        names.add(host.name)
        if host.address is not None:
            addresses.add(host.address)
        if host.hostname is not None:
            hostnames.add(host.hostname)
        hosts.append(host)

    return tuple(_assign_addresses(hosts, addresses | {dead_address}))


def _assign_addresses(hosts: list[HostConfig], used: set[str]) -> list[HostConfig]:
    """Give each host that has neither an address nor a hostname the next free 127.0.0.N."""
    assigned: list[HostConfig] = []
    next_number = 2
    for host in hosts:
        if host.address is None and host.hostname is None:
            while f"127.0.0.{next_number}" in used:
                next_number += 1
            if next_number > 254:
                raise ConfigError(f"host {host.name!r}: no free address left in 127.0.0.2-254")
            address = f"127.0.0.{next_number}"
            used.add(address)
            assigned.append(dataclasses.replace(host, address=address))
        else:
            assigned.append(host)
    return assigned


def _parse_host(index: int, raw_host: Any) -> HostConfig:
    if not isinstance(raw_host, dict):
        raise ConfigError(f"host #{index + 1}: expected an object, got {raw_host!r}")

    name = raw_host.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ConfigError(
            f"host #{index + 1}: invalid 'name': {name!r} "
            "(expected 1 to 64 letters, digits, '_', '.' or '-')"
        )
    where = f"host {name!r}"

    profile = raw_host.get("profile")
    if profile not in PROFILES:
        raise _fail(where, "profile", profile, "expected one of " + ", ".join(PROFILES))

    options = _parse_options(where, profile, raw_host)
    address, hostname, port = _parse_placement(where, raw_host)

    if hostname is not None and profile == "recovering" and options["fail_mode"] == "refuse":
        raise ConfigError(
            f"{where}: 'fail_mode' 'refuse' needs a host with its own 'address'. "
            "Use 'fail_mode': '503' for a virtual host"
        )
    if hostname is not None and profile == "dead":
        address = None

    return HostConfig(
        name=name, profile=profile, address=address, hostname=hostname, port=port, **options
    )


def _parse_options(where: str, profile: str, raw_host: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {**_COMMON_OPTIONS, **_PROFILE_OPTIONS[profile]}
    for key in raw_host:
        if key not in allowed and key not in _PLACEMENT_KEYS:
            names = ", ".join([*_PLACEMENT_KEYS, *allowed])
            raise ConfigError(
                f"{where}: unknown key {key!r} for profile {profile!r} (allowed: {names})"
            )

    options: dict[str, Any] = {}
    for key, (default, validate) in allowed.items():
        if key in raw_host:
            options[key] = validate(where, key, raw_host[key])
        else:
            options[key] = default
    return options


def _parse_placement(
    where: str, raw_host: Mapping[str, Any]
) -> tuple[str | None, str | None, int | None]:
    address = raw_host.get("address")
    hostname = raw_host.get("hostname")
    port = raw_host.get("port")

    if address is not None and hostname is not None:
        raise ConfigError(f"{where}: set 'address' or 'hostname', not both")

    if address is not None:
        address = _loopback_address(where, "address", address)
        if address == VIRTUAL_ADDRESS:
            raise _fail(
                where,
                "address",
                address,
                "127.0.0.1 is reserved for the virtual hosts' listener, so use 127.0.0.2 or above",
            )
    if hostname is not None:
        hostname = _hostname(where, hostname)
    if port is not None:
        if hostname is not None:
            raise ConfigError(
                f"{where}: 'port' is only for hosts with an 'address', "
                "because virtual hosts share the site's port"
            )
        port = _port(where, port, allow_zero=False)
    return address, hostname, port


def _hostname(where: str, value: Any) -> str:
    expected = "expected a lowercase DNS name such as 'h1.test'"
    if not isinstance(value, str) or len(value) > 253:
        raise _fail(where, "hostname", value, expected)
    labels = value.split(".")
    if not all(_LABEL_PATTERN.match(label) for label in labels):
        raise _fail(where, "hostname", value, expected)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value
    raise _fail(where, "hostname", value, "expected a name. For an IP address, use 'address'")


def parse_host_flag(flag: str) -> dict[str, Any]:
    """Parse ``NAME=PROFILE[:key=value,...]`` from the command line into a host object.

    Values are read as JSON when they parse (``0.4``, ``true``, ``[0.01, 0.05]``),
    otherwise as strings (``h1.test``). Commas inside brackets do not split.
    """
    name, equals, rest = flag.partition("=")
    if not equals or not name:
        raise ConfigError(f"--host {flag!r}: expected NAME=PROFILE[:key=value,...]")

    profile, _colon, options_text = rest.partition(":")
    host: dict[str, Any] = {"name": name, "profile": profile}
    for item in _split_options(options_text):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"--host {flag!r}: expected key=value, got {item!r}")
        host[key.strip()] = _flag_value(value.strip())
    return host


def _split_options(text: str) -> list[str]:
    items: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        current += char
    if current:
        items.append(current)
    return [item for item in items if item.strip()]


def _flag_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
