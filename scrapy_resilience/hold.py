"""The request hold: requests that must not be downloaded yet wait here.

A held request is off the downloader, so it never counts toward
``CONCURRENT_REQUESTS``. Requests enter the hold from two places:

* admission (:class:`~scrapy_resilience.CircuitBreakerMiddleware`) returns a
  scheduler-originated request it cannot admit now, and the engine sends it
  back through ``engine.crawl``; the ``request_scheduled`` handler here takes
  it and raises :exc:`~scrapy.exceptions.IgnoreRequest`, which drops that
  scheduling silently;
* a retry made by :class:`~scrapy_resilience.BackoffRetryMiddleware` or by
  :func:`scrapy_resilience.get_retry_request` travels the same way and waits
  out its backoff.

Each held request is released with ``engine.crawl`` when it is due and its
domain can take it, with ``dont_filter=True`` so the dupefilter does not drop a
request it has already seen; admission restores the original flag and
priority. Beyond ``RESILIENCE_HOLD_MAX_REQUESTS`` in memory, requests spill to
per-domain disk queues. With ``JOBDIR``, what is held at close is saved and
restored on resume.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import pickle
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy.utils.request import request_from_dict

if TYPE_CHECKING:
    from scrapy import Request

    from scrapy_resilience.runtime import Runtime

logger = logging.getLogger(__name__)

#: Meta key that carries the hold's bookkeeping while a request sits in the
#: scheduler or a disk queue; admission removes it before the download, so it
#: never reaches ``response.meta``.
META_KEY = "_resilience"

#: Priority of released probes and of the first request after a pause, so they
#: leave the scheduler before anything else.
TOP_PRIORITY = 1_000_000_000

STATE_FILE = "resilience-hold.pickle"


@dataclass(order=True)
class HeldEntry:
    """One held request; entries sort by due time, then priority, then age."""

    due: float
    neg_priority: int
    seq: int
    request: Request = field(compare=False)
    reason: str = field(compare=False, default="held")


@dataclass
class DomainHold:
    """The held requests of one domain: a heap in memory and a disk queue."""

    key: str
    heap: list[HeldEntry] = field(default_factory=list)
    disk: Any = None
    disk_count: int = 0

    def __len__(self) -> int:
        return len(self.heap) + self.disk_count


class RequestHold:
    """Hold requests off the downloader and release each when it may go."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.max_in_memory = runtime.config.hold_max_requests
        self._domains: dict[str, DomainHold] = {}
        self._seq = itertools.count()
        self._in_memory = 0
        self._size = 0
        #: Held requests by hold reason (``"retry"``, ``"open"``, ``"paced"``...),
        #: in memory and on disk; the health monitor reads it.
        self.reasons: Counter[str] = Counter()
        self._spill_dir: Path | None = None
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None

    def __len__(self) -> int:
        return self._size

    def domain_sizes(self) -> dict[str, int]:
        return {key: len(hold) for key, hold in self._domains.items() if len(hold)}

    def add(self, request: Request, key: str, due: float, reason: str) -> None:
        """Hold ``request`` for domain ``key`` until at least ``due`` (monotonic)."""
        hold = self._domains.get(key)
        if hold is None:
            hold = self._domains[key] = DomainHold(key)
        entry = HeldEntry(due, -request.priority, next(self._seq), request, reason)

        if (self._in_memory >= self.max_in_memory or hold.disk_count) and self._spill(hold, entry):
            pass
        else:
            heapq.heappush(hold.heap, entry)
            self._in_memory += 1

        self._size += 1
        self.reasons[reason] += 1
        state = self.runtime.domain(key)
        state.held += 1
        stats = self.runtime.stats
        stats.inc_value("resilience/hold/held")
        stats.max_value("resilience/hold/max_size", self._size)
        self.runtime.wake_at(due)

    def pump(self) -> None:
        """Release every held request that is due and whose domain can take it."""
        now = self.runtime.clock()
        for key in list(self._domains):
            hold = self._domains[key]
            if not len(hold):
                self._forget(key)
                continue
            self._pump_domain(hold, now)

    def release_all(self, key: str) -> int:
        """Release every request of a domain at once; return how many.

        Used when a domain is given up: admission then fails each with
        :exc:`~scrapy_resilience.CircuitOpenError`, so its errback runs.
        """
        hold = self._domains.get(key)
        if hold is None:
            return 0
        count = 0
        while len(hold):
            entry = self._pop(hold)
            self._release(entry, key, top=False)
            count += 1
        self._forget(key)
        return count

    def only_open_domains_left(self) -> bool:
        """Return whether every held request belongs to a domain whose circuit is open."""
        registry = self.runtime.registry
        for key, hold in self._domains.items():
            if not len(hold):
                continue
            state = registry.peek(key)
            if state is None or state.circuit.state.value != "open" or state.circuit.given_up:
                return False
        return bool(self._size)

    def open_domain_keys(self) -> list[str]:
        return [key for key, hold in self._domains.items() if len(hold)]

    def drain_entries(self) -> list[tuple[Request, float, str, str]]:
        """Remove and return every held request as (request, due, reason, key)."""
        entries = []
        for key in list(self._domains):
            hold = self._domains[key]
            while len(hold):
                entry = self._pop(hold)
                self.runtime.domain(key).held -= 1
                entries.append((entry.request, entry.due, entry.reason, key))
            self._forget(key)
        self._size = 0
        return entries

    def close(self) -> None:
        for hold in self._domains.values():
            if hold.disk is not None:
                hold.disk.close()
        if self._temp_dir is not None:
            self._temp_dir.cleanup()

    # Persistence across runs (JOBDIR)

    def save(self, jobdir: str) -> int:
        """Write every held request and the registry to ``jobdir``; return the count."""
        now = self.runtime.clock()
        spider = self.runtime.crawler.spider
        held = []
        for request, due, reason, key in self.drain_entries():
            try:
                serialized = request.to_dict(spider=spider)
            except (ValueError, TypeError, AttributeError) as error:
                # Not one request can stop the others from being saved.
                self.runtime.record_unfinished(request, key, reason, max(0.0, due - now))
                logger.warning(
                    "Cannot save held %(request)s to JOBDIR: %(error)s",
                    {"request": request, "error": error},
                )
                continue
            held.append(
                {
                    "request": serialized,
                    "remaining": max(0.0, due - now),
                    "reason": reason,
                    "key": key,
                }
            )
        state = {"version": 1, "held": held, "registry": self.runtime.registry.snapshot(now)}
        path = Path(jobdir, STATE_FILE)
        temporary = path.with_suffix(".tmp")
        with temporary.open("wb") as file:
            pickle.dump(state, file, protocol=4)
        temporary.replace(path)
        return len(held)

    def restore(self, jobdir: str) -> int:
        """Load what :meth:`save` wrote, once; return how many requests it held."""
        path = Path(jobdir, STATE_FILE)
        if not path.exists():
            return 0
        with path.open("rb") as file:
            state = pickle.load(file)
        # Remove the file before holding anything, so a second start cannot
        # load the same requests again.
        path.unlink()

        now = self.runtime.clock()
        self.runtime.registry.restore(state.get("registry", {}), now)
        spider = self.runtime.crawler.spider
        for item in state.get("held", []):
            request = request_from_dict(item["request"], spider=spider)
            self.add(request, item["key"], now + float(item["remaining"]), item["reason"])
        return len(state.get("held", []))

    # Internals

    def _pump_domain(self, hold: DomainHold, now: float) -> None:
        runtime = self.runtime
        key = hold.key
        state = runtime.domain(key)
        while len(hold):
            entry = self._peek(hold)
            if entry.due > now:
                runtime.wake_at(entry.due)
                return
            verdict = runtime.verdict_for_release(state, now)
            if verdict is None:
                return
            top = verdict.probe or state.after_pause
            self._pop(hold)
            self._release(entry, key, top=top)
            if verdict.decision.value == "admit" and (top or state.delay > 0):
                # Probes, the first request after a pause and paced requests
                # go alone; the next waits for this one to be admitted.
                return

    def _release(self, entry: HeldEntry, key: str, *, top: bool) -> None:
        request = entry.request
        runtime = self.runtime
        state = runtime.domain(key)
        state.held -= 1
        state.released += 1
        self._size -= 1

        bookkeeping = request.meta.setdefault(META_KEY, {})
        bookkeeping.setdefault("dont_filter", request.dont_filter)
        bookkeeping.setdefault("priority", request.priority)
        bookkeeping["released"] = key
        request.dont_filter = True
        if top:
            request.priority = TOP_PRIORITY

        runtime.stats.inc_value("resilience/hold/released")
        runtime.crawl(request)

    def _peek(self, hold: DomainHold) -> HeldEntry:
        if not hold.heap:
            self._unspill(hold)
        return hold.heap[0]

    def _pop(self, hold: DomainHold) -> HeldEntry:
        if not hold.heap:
            self._unspill(hold)
        self._in_memory -= 1
        entry = heapq.heappop(hold.heap)
        self.reasons[entry.reason] -= 1
        return entry

    def _forget(self, key: str) -> None:
        hold = self._domains.pop(key, None)
        if hold is not None and hold.disk is not None:
            hold.disk.close()

    def _spill(self, hold: DomainHold, entry: HeldEntry) -> bool:
        """Push an entry to its domain's disk queue; return False when the
        request cannot be serialized (a callback that is not a spider method,
        say), and the caller keeps it in memory instead."""
        if hold.disk is None:
            hold.disk = self._open_disk_queue(hold.key)
        request = entry.request
        request.meta.setdefault(META_KEY, {})["hold"] = (entry.due, entry.reason)
        try:
            hold.disk.push(request)
        except (ValueError, TypeError, AttributeError, pickle.PicklingError) as error:
            del request.meta[META_KEY]["hold"]
            if not request.meta[META_KEY]:
                del request.meta[META_KEY]
            self.runtime.stats.inc_value("resilience/hold/unserializable")
            logger.debug(
                "Keeping %(request)s in memory: %(error)s", {"request": request, "error": error}
            )
            return False
        hold.disk_count += 1
        self.runtime.stats.inc_value("resilience/hold/spilled")
        return True

    def _unspill(self, hold: DomainHold) -> None:
        # Bring back a batch, so a domain with a long disk queue keeps the
        # order of its requests without one disk read per release.
        room = max(1, min(hold.disk_count, self.max_in_memory - self._in_memory, 256))
        for _ in range(room):
            request = hold.disk.pop()
            if request is None:
                hold.disk_count = 0
                break
            hold.disk_count -= 1
            due, reason = request.meta[META_KEY].pop("hold")
            if not request.meta[META_KEY]:
                del request.meta[META_KEY]
            entry = HeldEntry(due, -request.priority, next(self._seq), request, reason)
            heapq.heappush(hold.heap, entry)
            self._in_memory += 1

    def _open_disk_queue(self, key: str) -> Any:
        if self._spill_dir is None:
            jobdir = self.runtime.crawler.settings.get("JOBDIR")
            if jobdir:
                self._spill_dir = Path(jobdir, "resilience-spill")
            else:
                self._temp_dir = tempfile.TemporaryDirectory(prefix="resilience-spill-")
                self._spill_dir = Path(self._temp_dir.name)
            self._spill_dir.mkdir(parents=True, exist_ok=True)
        queue_class = self.runtime.config.hold_disk_queue
        path = self._spill_dir / f"domain-{abs(hash(key)):x}-{next(self._seq)}"
        return queue_class.from_crawler(self.runtime.crawler, str(path))
