"""The health monitor: a periodic status line, and per-domain detail at close.

Every ``RESILIENCE_HEALTH_INTERVAL`` seconds it logs one INFO line, in the
manner of Scrapy's LogStats. The line gives the circuits open and half-open,
the domains given up, the requests held and the retries among them, the range
of pacing delays, the memory against the memory guard's limit, and the
concurrency in force.

It adds per-domain fields to the report that the runtime writes at close
(``RESILIENCE_REPORT_FILE``) through ``runtime.report_extenders``, and logs
the worst domains as a compact table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from twisted.internet.task import LoopingCall

from scrapy_resilience import signals as resilience_signals
from scrapy_resilience.core.circuit import CircuitState
from scrapy_resilience.downloadermiddlewares.retry import CATEGORY_KEY, COUNTS_KEY
from scrapy_resilience.extensions.memory import MemoryGuard
from scrapy_resilience.report import domain_fields
from scrapy_resilience.runtime import Runtime, _call_later
from scrapy_resilience.settings import get_bool

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from typing_extensions import Self

    from scrapy_resilience.core.registry import DomainState
    from scrapy_resilience.runtime import Attempt

logger = logging.getLogger(__name__)

#: How many domains of each kind the status line names.
STATUS_DOMAINS = 3

STATUS_MESSAGE = (
    "Resilience: %(open)d circuits open%(open_domains)s, %(half_open)d half-open"
    "%(half_open_domains)s, %(given_up)d domains given up; %(held)d requests held "
    "(%(retries)d retries); delay %(delay)s; memory %(memory)s; "
    "concurrency %(concurrency)d of %(max_concurrency)d"
)

TABLE_COLUMNS = (
    ("domain", 24),
    ("state", 10),
    ("attempts", 8),
    ("responses", 9),
    ("retries", 7),
    ("trips", 5),
    ("open s", 8),
    ("p95 s", 7),
    ("failures", 28),
    ("given up", 0),
)


@dataclass(slots=True)
class DomainHealth:
    """The monitor's counts for one domain, beyond the registry's counters.

    ``open_since`` is the monotonic time the circuit last opened, or None
    while it is closed. ``requests_given_up`` maps a category to the requests
    that used up their retries with it.
    """

    responses: int = 0
    retries: int = 0
    open_seconds: float = 0.0
    open_since: float | None = None
    requests_given_up: dict[str, int] = field(default_factory=dict)

    def open_seconds_at(self, now: float) -> float:
        """Return the time spent open, counting an open period still running."""
        running = now - self.open_since if self.open_since is not None else 0.0
        return self.open_seconds + running


class HealthMonitor:
    """Log the crawl's health every interval, and add per-domain detail to the report."""

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "RESILIENCE_HEALTH_ENABLED"):
            raise NotConfigured
        self.crawler = crawler
        self.runtime = Runtime.of(crawler)
        config = self.runtime.config
        self.interval = config.health_interval
        self.worst_domains = config.health_worst_domains
        self.max_concurrency = max(1, crawler.settings.getint("CONCURRENT_REQUESTS"))
        self.domains: dict[str, DomainHealth] = {}
        self._task: LoopingCall | None = None
        self._unchecked_failures: list[tuple[Request, str]] = []
        self._check_call: Any = None

        self.runtime.attempt_listeners.append(self.on_attempt)
        self.runtime.report_extenders.append(self.extend_report)
        connect = crawler.signals.connect
        connect(self.spider_opened, signal=signals.spider_opened)
        connect(self.spider_closed, signal=signals.spider_closed)
        connect(self.circuit_opened, signal=resilience_signals.circuit_opened)
        connect(self.circuit_closed, signal=resilience_signals.circuit_closed)
        connect(self.domain_given_up, signal=resilience_signals.domain_given_up)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # Counting

    def on_attempt(self, attempt: Attempt) -> None:
        """Count one attempt: its response, whether it was a retry, and a failure
        whose retries may now be used up."""
        health = self._health(attempt.key)
        if attempt.response is not None:
            health.responses += 1
        if _is_retry(attempt.request):
            health.retries += 1
        if attempt.category is not None:
            self._unchecked_failures.append((attempt.request, attempt.key))
            if self._check_call is None:
                # The retry middleware decides later in the same middleware
                # chain, after this listener returns, so check once it has run.
                self._check_call = _call_later(0, self._check_given_up)

    def _check_given_up(self) -> None:
        # NOTE: an asynchronous downloader middleware between the retry middleware
        # (550) and the observer (990) would let this run before the retry
        # middleware decides, and such a request would not be counted as given up.
        self._check_call = None
        failures, self._unchecked_failures = self._unchecked_failures, []
        for request, key in failures:
            category = request.meta.get(CATEGORY_KEY)
            if category:
                given_up = self._health(key).requests_given_up
                given_up[category] = given_up.get(category, 0) + 1

    def circuit_opened(self, domain: str, **kwargs: Any) -> None:
        health = self._health(domain)
        if health.open_since is None:
            health.open_since = self.runtime.clock()

    def circuit_closed(self, domain: str, **kwargs: Any) -> None:
        self._end_open_period(domain)

    def domain_given_up(self, domain: str, **kwargs: Any) -> None:
        self._end_open_period(domain)

    def _end_open_period(self, domain: str) -> None:
        health = self._health(domain)
        if health.open_since is not None:
            health.open_seconds += self.runtime.clock() - health.open_since
            health.open_since = None

    def _health(self, key: str) -> DomainHealth:
        health = self.domains.get(key)
        if health is None:
            health = self.domains[key] = DomainHealth()
        return health

    def _forget_evicted(self) -> None:
        """Drop the records of domains the registry evicted, so memory stays
        bounded by ``RESILIENCE_REGISTRY_MAX_DOMAINS``."""
        registry = self.runtime.registry
        if len(self.domains) > len(registry):
            registry.forget_evicted(self.domains)

    # The status line

    def spider_opened(self, spider: Spider) -> None:
        self._task = LoopingCall(self.log_status, spider)
        self._task.start(self.interval, now=False)

    def log_status(self, spider: Spider) -> None:
        """Log the status line once."""
        self._forget_evicted()
        logger.info(STATUS_MESSAGE, self.status(), extra={"spider": spider})

    def status(self) -> dict[str, Any]:
        """Return the arguments of the status line."""
        open_keys: list[str] = []
        half_open_keys: list[str] = []
        given_up = 0
        delays: list[float] = []
        for state in self.runtime.registry:
            circuit = state.circuit
            if circuit.given_up:
                given_up += 1
            elif circuit.state is CircuitState.OPEN:
                open_keys.append(state.key)
            elif circuit.state is CircuitState.HALF_OPEN:
                half_open_keys.append(state.key)
            if state.delay > 0:
                delays.append(state.delay)

        hold = self.runtime.hold
        concurrency = self.max_concurrency
        engine = self.crawler.engine
        if engine is not None:
            concurrency = engine.downloader.total_concurrency
        return {
            "open": len(open_keys),
            "open_domains": _first_domains(open_keys),
            "half_open": len(half_open_keys),
            "half_open_domains": _first_domains(half_open_keys),
            "given_up": given_up,
            "held": len(hold),
            "retries": hold.reasons["retry"],
            "delay": _delay_range(delays),
            "memory": self._memory_text(),
            "concurrency": concurrency,
            "max_concurrency": self.max_concurrency,
        }

    def _memory_text(self) -> str:
        guard = self._memory_guard()
        if guard is None:
            return "not guarded"
        sample = guard.last_sample
        if sample is None:
            return f"not measured yet, limit {guard.limit_mb:.0f} MB"
        return f"{sample.memory_mb:.0f} of {guard.limit_mb:.0f} MB"

    def _memory_guard(self) -> MemoryGuard | None:
        extensions = getattr(self.crawler, "extensions", None)
        for extension in getattr(extensions, "middlewares", ()):
            if isinstance(extension, MemoryGuard):
                return extension
        return None

    # The report and the table at close

    def extend_report(self, key: str, fields: dict[str, Any]) -> None:
        """Add the monitor's fields to one domain's report entry (see
        ``runtime.report_extenders``)."""
        self._check_given_up()
        health = self.domains.get(key) or DomainHealth()
        given_up = {"circuit_open": fields.get("rejected", 0), **health.requests_given_up}
        fields["responses"] = health.responses
        fields["retries"] = health.retries
        fields["open_seconds"] = round(health.open_seconds_at(self.runtime.clock()), 3)
        fields["requests_given_up"] = {reason: n for reason, n in given_up.items() if n}

    def spider_closed(self, spider: Spider, reason: str) -> None:
        if self._task is not None and self._task.running:
            self._task.stop()
        if self._check_call is not None and self._check_call.active():
            self._check_call.cancel()
        self._check_given_up()
        if self.worst_domains:
            self.log_table(spider)

    def log_table(self, spider: Spider) -> None:
        """Log the domains that fared worst as a table, or one line when all were healthy."""
        active = [state for state in self.runtime.registry if state.attempts]
        troubled = [self.domain_fields(state) for state in active if _is_troubled(state)]
        if not troubled:
            message = (
                "Resilience: the only domain was healthy"
                if len(active) == 1
                else "Resilience: all %(count)d domains were healthy"
            )
            logger.info(message, {"count": len(active)}, extra={"spider": spider})
            return
        troubled.sort(key=_severity, reverse=True)
        listed = troubled[: self.worst_domains]
        logger.info(
            "Resilience: %(troubled)d of %(count)d domains had failures; the worst %(listed)d:"
            "\n%(table)s",
            {
                "troubled": len(troubled),
                "count": len(active),
                "listed": len(listed),
                "table": format_table(listed),
            },
            extra={"spider": spider},
        )

    def domain_fields(self, state: DomainState) -> dict[str, Any]:
        """Return one domain's report fields, with its key under ``domain``."""
        return {"domain": state.key, **domain_fields(self.runtime, state)}


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """Return report rows as a fixed-width text table, one line per domain."""
    lines = [_format_line([name for name, _ in TABLE_COLUMNS])]
    for row in rows:
        state = "given up" if row["given_up"] else row["state"]
        latency = row.get("latency_p95")
        cells = [
            row["domain"],
            state,
            str(row["attempts"]),
            str(row.get("responses", "-")),
            str(row.get("retries", "-")),
            str(row["circuit_opened"]),
            f"{row.get('open_seconds', 0.0):.1f}",
            "-" if latency is None else f"{latency:.2f}",
            _counts_text(row["failures"]) or "-",
            _given_up_text(row),
        ]
        lines.append(_format_line(cells))
    return "\n".join(lines)


def _format_line(cells: list[str]) -> str:
    padded = [cell.ljust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS, strict=True)]
    return "  ".join(padded).rstrip()


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _given_up_text(row: dict[str, Any]) -> str:
    parts = []
    requests = _counts_text(row.get("requests_given_up", {}))
    if requests:
        parts.append(f"requests: {requests}")
    if row["given_up"]:
        parts.append(f"domain: {row['give_up_reason']}")
    return "; ".join(parts) or "-"


def _is_troubled(state: DomainState) -> bool:
    return bool(state.failures or state.circuit.given_up or state.rejected)


def _severity(row: dict[str, Any]) -> tuple[bool, int, float, int]:
    failures = sum(row["failures"].values())
    return (row["given_up"], failures, row.get("open_seconds", 0.0), row["attempts"])


def _first_domains(keys: list[str]) -> str:
    if not keys:
        return ""
    names = sorted(keys)
    shown = ", ".join(names[:STATUS_DOMAINS])
    more = len(names) - STATUS_DOMAINS
    return f" ({shown} and {more} more)" if more > 0 else f" ({shown})"


def _delay_range(delays: list[float]) -> str:
    if not delays:
        return "none"
    if len(delays) == 1:
        return f"{delays[0]:.2f} s on 1 domain"
    return f"{min(delays):.2f} to {max(delays):.2f} s on {len(delays)} domains"


def _is_retry(request: Request) -> bool:
    """Return whether an attempt retries an earlier one: a retry made by the
    backoff retry (its attempt count) or by ``get_retry_request``
    (``retry_times``)."""
    counts = request.meta.get(COUNTS_KEY) or {}
    return int(counts.get("attempts", 1)) > 1 or int(request.meta.get("retry_times", 0)) > 0
