"""Per-domain circuit breaker: closed, open, half-open.

Pure logic with an injected clock (``now`` arguments, monotonic seconds) and an
injected random generator for the open-time jitter.

Rules, in order:

1. Closed: every attempt may start, except that a suspect domain (one that
   has never succeeded in this crawl, or is in a streak of counted failures)
   may have at most ``failure_threshold - consecutive_failures`` attempts
   unfinished.
2. Network and timeout failures always count as consecutive failures; server
   failures count only while the domain has never succeeded. A success resets
   the count. Throttled and content failures never count.
3. The circuit opens when the consecutive count reaches ``failure_threshold``,
   or when at least ``failure_rate`` of the last ``window`` attempts failed
   (network, timeout or server) with at least ``min_attempts`` of them.
4. Open lasts ``open_seconds``, doubled on each re-open up to
   ``open_max_seconds``, then stretched upward by up to ``open_jitter``.
5. When the open time ends the circuit is half-open and admits
   ``half_open_probes`` attempts. A successful probe closes it and resets the
   doubling; a failed one re-opens it.
6. A domain that never succeeded is given up when its first probe fails; one
   that succeeded, after ``max_reopens`` failed probes in a row. In drain mode
   (nothing else left to crawl) any failed probe gives the domain up.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from scrapy_resilience.core.classify import Category

#: Categories that count against the failure rate; a probe failing with one of
#: them re-opens the circuit.
WINDOW_CATEGORIES = frozenset({Category.NETWORK, Category.TIMEOUT, Category.SERVER})


class CircuitState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """Thresholds and timings of every domain's circuit; seconds throughout."""

    failure_threshold: int = 5
    failure_rate: float = 0.8
    window: int = 20
    min_attempts: int = 10
    open_seconds: float = 60.0
    open_max_seconds: float = 600.0
    open_jitter: float = 0.1
    half_open_probes: int = 1
    max_reopens: int = 3


class Transition(NamedTuple):
    """A change of circuit state, for signals, logs and stats.

    ``event`` is ``"opened"``, ``"half_opened"``, ``"closed"`` or
    ``"given_up"``.
    """

    event: str
    reason: str = ""
    open_seconds: float = 0.0
    reopens: int = 0


class Circuit:
    """The circuit of one domain."""

    __slots__ = (
        "_window_bits",
        "_window_len",
        "config",
        "consecutive_failures",
        "failed_probes",
        "final_probe",
        "give_up_reason",
        "given_up",
        "open_until",
        "opens_since_close",
        "probes_in_flight",
        "proven",
        "state",
        "times_opened",
    )

    def __init__(self, config: CircuitConfig) -> None:
        self.config = config
        self.state = CircuitState.CLOSED
        self.proven = False
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.opens_since_close = 0
        self.times_opened = 0
        self.failed_probes = 0
        self.probes_in_flight = 0
        self.final_probe = False
        self.given_up = False
        self.give_up_reason: str | None = None
        # The last `window` attempt outcomes as bits (1 = failed), newest lowest.
        self._window_bits = 0
        self._window_len = 0

    @property
    def suspect(self) -> bool:
        """Whether the domain has not proven itself: never succeeded, or failing."""
        return not self.proven or self.consecutive_failures > 0

    def poll(self, now: float) -> Transition | None:
        """Move an open circuit whose time is up to half-open."""
        if self.state is not CircuitState.OPEN or self.given_up or now < self.open_until:
            return None
        self.state = CircuitState.HALF_OPEN
        self.probes_in_flight = 0
        return Transition("half_opened")

    def allowance(self, per_domain_limit: int) -> int:
        """Return how many attempts may be unfinished at once right now."""
        if self.state is CircuitState.OPEN:
            return 0
        if self.state is CircuitState.HALF_OPEN:
            return min(per_domain_limit, self.config.half_open_probes)
        if self.suspect:
            return min(per_domain_limit, self.attempt_limit())
        return per_domain_limit

    def attempt_limit(self) -> int:
        """Return how many attempts a suspect closed circuit may have unfinished:
        the failures it may still take before it opens."""
        return max(1, self.config.failure_threshold - self.consecutive_failures)

    def can_probe(self) -> bool:
        """Return whether a half-open circuit has a probe slot free."""
        return (
            self.state is CircuitState.HALF_OPEN
            and self.probes_in_flight < self.config.half_open_probes
        )

    def start_probe(self) -> None:
        self.probes_in_flight += 1

    def end_probe_without_verdict(self) -> None:
        """Free a probe slot for an attempt that proved nothing (throttled, ignored)."""
        self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def record_success(self, now: float, *, probe: bool = False) -> Transition | None:
        """Record an attempt the domain answered; close a half-open circuit."""
        self.proven = True
        self.consecutive_failures = 0
        if probe:
            self.end_probe_without_verdict()

        if self.state is CircuitState.HALF_OPEN:
            self._close()
            return Transition("closed")

        self._push_window(failed=False)
        return None

    def record_failure(
        self, category: Category, now: float, rng: random.Random, *, probe: bool = False
    ) -> Transition | None:
        """Record a failed attempt, and open the circuit when a rule calls for it."""
        if category not in WINDOW_CATEGORIES:
            if probe:
                self.end_probe_without_verdict()
            return None

        if self.state is CircuitState.HALF_OPEN:
            if not probe:
                return None
            self.end_probe_without_verdict()
            return self._probe_failed(now, rng)

        if self.state is CircuitState.OPEN:
            # An attempt admitted before the circuit opened: no new evidence.
            return None

        self._push_window(failed=True)
        if category is not Category.SERVER or not self.proven:
            self.consecutive_failures += 1

        if self.consecutive_failures >= self.config.failure_threshold:
            return self._open(now, rng, "consecutive")
        if self._window_len >= self.config.min_attempts and self._window_failures() >= (
            self.config.failure_rate * self._window_len
        ):
            return self._open(now, rng, "failure_rate")
        return None

    def give_up(self, reason: str) -> Transition:
        """Stop trying the domain for the rest of the crawl."""
        self.state = CircuitState.OPEN
        self.given_up = True
        self.give_up_reason = reason
        self.open_until = math.inf
        self.probes_in_flight = 0
        return Transition("given_up", reason=reason)

    def drain(self, now: float) -> bool:
        """Cut the remaining open time to at most ``open_seconds`` and make the
        next probe final. Return whether this changed anything (the circuit
        was open and not drained already)."""
        if self.state is not CircuitState.OPEN or self.given_up or self.final_probe:
            return False
        self.open_until = min(self.open_until, now + self.config.open_seconds)
        self.final_probe = True
        return True

    def to_state(self, now: float) -> dict[str, Any]:
        """Return a JSON-friendly snapshot, open time as remaining seconds."""
        remaining = None
        if self.state is CircuitState.OPEN and not self.given_up:
            remaining = max(0.0, self.open_until - now)
        return {
            "state": self.state.value,
            "proven": self.proven,
            "consecutive_failures": self.consecutive_failures,
            "open_remaining": remaining,
            "opens_since_close": self.opens_since_close,
            "times_opened": self.times_opened,
            "failed_probes": self.failed_probes,
            "given_up": self.given_up,
            "give_up_reason": self.give_up_reason,
            "window_bits": self._window_bits,
            "window_len": self._window_len,
        }

    def restore(self, state: dict[str, Any], now: float) -> None:
        """Load a snapshot made by :meth:`to_state`, in a new process."""
        self.state = CircuitState(state["state"])
        self.proven = bool(state["proven"])
        self.consecutive_failures = int(state["consecutive_failures"])
        self.opens_since_close = int(state["opens_since_close"])
        self.times_opened = int(state.get("times_opened", 0))
        self.failed_probes = int(state["failed_probes"])
        self.given_up = bool(state["given_up"])
        self.give_up_reason = state.get("give_up_reason")
        self._window_bits = int(state.get("window_bits", 0))
        self._window_len = int(state.get("window_len", 0))
        self.probes_in_flight = 0
        if self.given_up:
            self.open_until = math.inf
        elif self.state is CircuitState.OPEN:
            self.open_until = now + float(state["open_remaining"] or 0.0)
        elif self.state is CircuitState.HALF_OPEN:
            # The probe in flight at shutdown was lost; probe again.
            self.probes_in_flight = 0

    def _probe_failed(self, now: float, rng: random.Random) -> Transition:
        self.failed_probes += 1
        if not self.proven:
            return self.give_up("never answered, and its probe failed")
        if self.final_probe:
            return self.give_up("its probe failed with nothing else left to crawl")
        if self.failed_probes >= self.config.max_reopens:
            return self.give_up(f"{self.failed_probes} probes failed in a row")
        return self._open(now, rng, "probe_failed")

    def _open(self, now: float, rng: random.Random, reason: str) -> Transition:
        self.state = CircuitState.OPEN
        self.opens_since_close += 1
        self.times_opened += 1
        doublings = min(self.opens_since_close - 1, 64)
        base = min(self.config.open_max_seconds, self.config.open_seconds * 2.0**doublings)
        duration = base * (1.0 + rng.uniform(0.0, self.config.open_jitter))
        self.open_until = now + duration
        return Transition(
            "opened",
            reason=reason,
            open_seconds=duration,
            reopens=self.opens_since_close,
        )

    def _close(self) -> None:
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opens_since_close = 0
        self.failed_probes = 0
        self.probes_in_flight = 0
        self.final_probe = False
        self._window_bits = 0
        self._window_len = 0

    def _push_window(self, *, failed: bool) -> None:
        mask = (1 << self.config.window) - 1
        self._window_bits = ((self._window_bits << 1) | int(failed)) & mask
        self._window_len = min(self._window_len + 1, self.config.window)

    def _window_failures(self) -> int:
        return bin(self._window_bits).count("1")
