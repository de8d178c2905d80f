"""The per-crawler state that every component of the bundle shares.

:class:`Runtime` is created by the first component built for a crawler and
stored on that crawler, so several crawlers in one process never share state.
It owns the :class:`~scrapy_resilience.core.registry.DomainRegistry`, the
:class:`~scrapy_resilience.hold.RequestHold`, the per-request bookkeeping, and
the signal handlers that keep the hold working (``request_scheduled``,
``spider_idle``, ``spider_opened``, ``spider_closed``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from scrapy import signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest
from twisted.internet.task import LoopingCall

from scrapy_resilience import signals as resilience_signals
from scrapy_resilience.core.registry import Decision, DomainRegistry, DomainState, Verdict
from scrapy_resilience.hold import META_KEY, RequestHold
from scrapy_resilience.report import write_report
from scrapy_resilience.settings import Config, load_config

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from scrapy.statscollectors import StatsCollector

    from scrapy_resilience.core.circuit import Transition
    from scrapy_resilience.core.classify import Category

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_scrapy_resilience_runtime"


@dataclass(slots=True)
class Track:
    """Bookkeeping of one request object between admission and its outcome."""

    key: str
    scheduled: bool
    admitted: bool = False
    suspect: bool = False
    probe: bool = False
    attempt_started: float | None = None
    latency: float | None = None
    retry_after: float | None = None
    finished: bool = False


@dataclass(slots=True)
class Attempt:
    """The outcome of one attempt that reached the download handler.

    ``category`` is None for an answer that is not a failure, and for an
    exception that says nothing about the domain (``IgnoreRequest``, a browser
    fault). ``track.latency`` is the attempt's own duration in seconds,
    measured by the observer for failures too.
    """

    track: Track
    request: Request
    category: Category | None
    response: Response | None = None
    exception: BaseException | None = None

    @property
    def key(self) -> str:
        return self.track.key

    @property
    def latency(self) -> float:
        return self.track.latency or 0.0


class Runtime:
    """Shared state and hold wiring of one crawler."""

    def __init__(
        self,
        crawler: Crawler,
        config: Config | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.crawler = crawler
        self.config = config or load_config(crawler.settings)
        self.clock = clock
        self.rng = rng or random.Random()
        assert crawler.stats is not None
        self.stats: StatsCollector = crawler.stats
        self.registry = DomainRegistry(
            self.config.circuit,
            rng=self.rng,
            max_domains=self.config.registry_max_domains,
            pace_jitter=self.config.pace_jitter,
            on_transition=self._on_transition,
        )
        self.hold = RequestHold(self)
        self.tracks: WeakKeyDictionary[Request, Track] = WeakKeyDictionary()
        # Admitted requests not finished yet, for the sweep; strong references,
        # removed by finish().
        self.admitted: dict[Request, Track] = {}
        # Requests returned to the engine to be held when they are scheduled:
        # request -> (due, reason).
        self.to_hold: WeakKeyDictionary[Request, tuple[float, str]] = WeakKeyDictionary()
        #: Called with every :class:`Attempt`, after the circuit recorded it;
        #: the adaptive throttle and the health monitor listen here.
        self.attempt_listeners: list[Callable[[Attempt], None]] = []
        #: Called by the report with each domain's key and its dict, to which
        #: each adds its own fields (the health monitor, the adaptive throttle).
        self.report_extenders: list[Callable[[str, dict[str, Any]], None]] = []
        self.circuit_active = False
        self.closing = False
        self.unfinished: list[dict[str, Any]] = []
        self.given_up: dict[str, str] = {}
        self.started = self.clock()
        self._wake_call: Any = None
        self._wake_time = float("inf")
        self._sweep_call: Any = None
        self._per_domain_limit = max(
            1,
            crawler.settings.getint("CONCURRENT_REQUESTS_PER_IP")
            or crawler.settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN"),
        )
        self._slot_settings: dict[str, dict[str, Any]] = crawler.settings.getdict("DOWNLOAD_SLOTS")
        self._download_delay = crawler.settings.getfloat("DOWNLOAD_DELAY")
        self._autothrottle = crawler.settings.getbool("AUTOTHROTTLE_ENABLED")
        self._connect_signals()

    @classmethod
    def of(cls, crawler: Crawler) -> Runtime:
        """Return the runtime of ``crawler``, creating it on first use."""
        runtime = getattr(crawler, _ATTRIBUTE, None)
        if runtime is None:
            runtime = cls(crawler)
            setattr(crawler, _ATTRIBUTE, runtime)
        return runtime

    @classmethod
    def find(cls, crawler: Crawler) -> Runtime | None:
        """Return the runtime of ``crawler`` if a component created one."""
        return getattr(crawler, _ATTRIBUTE, None)

    # Domains

    def domain_key(self, request: Request) -> str:
        """Return the domain key: Scrapy's download slot key (the hostname, or
        the ``download_slot`` meta key)."""
        slot = request.meta.get("download_slot")
        if slot is not None:
            return str(slot)
        engine = self.crawler.engine
        if engine is not None:
            return str(engine.downloader.get_slot_key(request))
        return urlsplit(request.url).hostname or ""

    def domain(self, key: str) -> DomainState:
        """Return a domain's state, applying its delay floor when it is new."""
        state = self.registry.peek(key)
        if state is None:
            state = self.registry.get(key)
            slot = self._slot_settings.get(key, {})
            state.floor_delay = float(slot.get("delay", self._download_delay) or 0.0)
        return state

    def per_domain_limit(self, key: str) -> int:
        slot = self._slot_settings.get(key)
        if slot and "concurrency" in slot:
            return max(1, int(slot["concurrency"]))
        return self._per_domain_limit

    def suspect_limit(self) -> int:
        """Return how many requests all suspect domains together may have unfinished."""
        total = self.crawler.settings.getint("CONCURRENT_REQUESTS")
        engine = self.crawler.engine
        if engine is not None and engine.downloader.total_concurrency > 0:
            total = engine.downloader.total_concurrency
        return max(1, int(total * self.config.unproven_share))

    def verdict(self, state: DomainState, now: float, *, paced: bool = True) -> Verdict:
        return self.registry.verdict(
            state, now, self.per_domain_limit(state.key), self.suspect_limit(), paced=paced
        )

    def verdict_for_release(self, state: DomainState, now: float) -> Verdict | None:
        """Return the verdict for releasing one more held request, or None to wait.

        Requests already released but not yet admitted count as in flight, so
        the hold never floods the scheduler with requests admission would send
        straight back.
        """
        if not self.circuit_active:
            return Verdict(Decision.ADMIT)
        if state.circuit.given_up:
            return Verdict(Decision.REJECT)
        state.inflight += state.released
        self.registry.suspect_inflight += state.released if state.circuit.suspect else 0
        try:
            verdict = self.verdict(state, now)
        finally:
            state.inflight -= state.released
            self.registry.suspect_inflight -= state.released if state.circuit.suspect else 0
        if verdict.decision is Decision.HOLD:
            if verdict.wake_at is not None:
                self.wake_at(verdict.wake_at)
            return None
        return verdict

    # Per-request bookkeeping

    def take_bookkeeping(self, request: Request) -> bool:
        """Remove the hold's meta bookkeeping from ``request`` before its download.

        Restore the ``dont_filter`` flag and priority it had before release.
        Return whether the request came from the scheduler.
        """
        bookkeeping = request.meta.pop(META_KEY, None)
        if not bookkeeping:
            return False
        if "dont_filter" in bookkeeping:
            request.dont_filter = bookkeeping["dont_filter"]
        if "priority" in bookkeeping:
            request.priority = bookkeeping["priority"]
        released = bookkeeping.get("released")
        if released is not None:
            state = self.registry.peek(released)
            if state is not None:
                state.released = max(0, state.released - 1)
        return bool(bookkeeping.get("scheduled") or released is not None)

    def finish(self, request: Request) -> Track | None:
        """Count the end of an admitted request once; return its track."""
        track = self.tracks.get(request)
        if track is None or track.finished:
            return track
        track.finished = True
        if track.admitted:
            self.admitted.pop(request, None)
            state = self.registry.peek(track.key)
            if state is not None:
                self.registry.finish(state, suspect=track.suspect)
            self.wake_soon()
        return track

    def notify_attempt(self, attempt: Attempt) -> None:
        for listener in self.attempt_listeners:
            listener(attempt)

    def track_admitted(self, request: Request, track: Track) -> None:
        """Start the bookkeeping of a request admission let into the downloader."""
        self.tracks[request] = track
        self.admitted[request] = track

    def hold_later(self, request: Request, due: float, reason: str) -> None:
        """Mark ``request``, about to be returned to the engine, to be held
        when it is scheduled."""
        self.to_hold[request] = (due, reason)

    def crawl(self, request: Request) -> None:
        engine = self.crawler.engine
        assert engine is not None
        engine.crawl(request)

    # Timers

    def wake_at(self, when: float) -> None:
        """Run :meth:`RequestHold.pump` at monotonic time ``when`` or earlier."""
        if when >= self._wake_time and self._wake_call is not None:
            return
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_time = when
        delay = max(0.0, when - self.clock())
        self._wake_call = _call_later(delay, self._wake)

    def wake_soon(self) -> None:
        self.wake_at(self.clock())

    def _wake(self) -> None:
        self._wake_call = None
        self._wake_time = float("inf")
        if self.crawler.engine is None or self.crawler.engine.spider is None:
            return
        self.hold.pump()

    def _sweep(self) -> None:
        """Finish admitted requests the downloader no longer has.

        Every path that ends a request calls :meth:`finish`. The sweep catches a
        middleware that returned a request or response past those hooks, so
        in-flight counts cannot leak.
        """
        engine = self.crawler.engine
        if engine is None:
            return
        active = engine.downloader.active
        for request in [request for request in self.admitted if request not in active]:
            self.stats.inc_value("resilience/admission/swept")
            self.finish(request)
        self.hold.pump()

    # Signal handlers

    def _connect_signals(self) -> None:
        crawler_signals = self.crawler.signals
        crawler_signals.connect(self._request_scheduled, signal=signals.request_scheduled)
        crawler_signals.connect(self._spider_idle, signal=signals.spider_idle)
        crawler_signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler_signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler_signals.connect(
            self._request_reached_downloader, signal=signals.request_reached_downloader
        )

    def _request_scheduled(self, request: Request, spider: Spider) -> None:
        ticket = self.to_hold.pop(request, None)
        if ticket is not None:
            due, reason = ticket
            self.hold.add(request, self.domain_key(request), due, reason)
            raise IgnoreRequest("held by scrapy-resilience")
        if META_KEY not in request.meta:
            request.meta[META_KEY] = {"scheduled": True}

    def _spider_idle(self, spider: Spider) -> None:
        if not len(self.hold) or self.closing:
            return
        engine = self.crawler.engine
        nothing_else = engine is not None and not engine.downloader.active
        if nothing_else and self.hold.only_open_domains_left():
            now = self.clock()
            drained = [
                key for key in self.hold.open_domain_keys() if self.domain(key).circuit.drain(now)
            ]
            if drained:
                logger.info(
                    "Only held requests of unavailable domains remain; probing %(count)d "
                    "domain(s) one last time: %(domains)s",
                    {"count": len(drained), "domains": ", ".join(sorted(drained))},
                    extra={"spider": spider},
                )
                for key in drained:
                    self.wake_at(self.domain(key).circuit.open_until)
        self.hold.pump()
        raise DontCloseSpider

    def _spider_opened(self, spider: Spider) -> None:
        self.started = self.clock()
        jobdir = self.crawler.settings.get("JOBDIR")
        if jobdir:
            restored = self.hold.restore(jobdir)
            if restored:
                self.stats.set_value("resilience/hold/restored", restored)
                logger.info(
                    "Restored %(count)d held requests from %(jobdir)s",
                    {"count": restored, "jobdir": jobdir},
                    extra={"spider": spider},
                )
        self._sweep_call = LoopingCall(self._sweep)
        self._sweep_call.start(1.0, now=False)

    def _spider_closed(self, spider: Spider, reason: str) -> None:
        self.closing = True
        if self._sweep_call is not None and self._sweep_call.running:
            self._sweep_call.stop()
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()

        jobdir = self.crawler.settings.get("JOBDIR")
        held = len(self.hold)
        if jobdir:
            try:
                saved = self.hold.save(jobdir)
            except OSError as error:
                saved = 0
                logger.error(
                    "Failed to save held requests to %(jobdir)s: %(error)s",
                    {"jobdir": jobdir, "error": error},
                    extra={"spider": spider},
                )
            if saved:
                self.stats.set_value("resilience/hold/persisted", saved)
                logger.info(
                    "Saved %(count)d held requests to %(jobdir)s; they resume with the job",
                    {"count": saved, "jobdir": jobdir},
                    extra={"spider": spider},
                )
        elif held:
            self._record_unfinished(spider)
        self.hold.close()
        if self.registry.evicted:
            self.stats.set_value("resilience/registry/evicted", self.registry.evicted)
        write_report(self, spider, reason)

    def _record_unfinished(self, spider: Spider) -> None:
        entries = self.hold.drain_entries()
        now = self.clock()
        for request, due, entry_reason, key in entries:
            self.record_unfinished(request, key, entry_reason, max(0.0, due - now))
        logger.warning(
            "The crawl closed with %(count)d held requests unfinished (set JOBDIR to keep "
            "them for the next run); the report lists them",
            {"count": len(entries)},
            extra={"spider": spider},
        )

    def record_unfinished(self, request: Request, key: str, reason: str, due_in: float) -> None:
        """Count a held request the crawl ends without, for stats and the report."""
        self.unfinished.append(
            {"url": request.url, "domain": key, "reason": reason, "due_in": due_in}
        )
        self.stats.set_value("resilience/hold/unfinished", len(self.unfinished))

    def _request_reached_downloader(self, request: Request, spider: Spider) -> None:
        # Delays are paced by admission; a slot delay would hold requests
        # inside the downloader, where they occupy CONCURRENT_REQUESTS.
        engine = self.crawler.engine
        if engine is None or not self.circuit_active or self._autothrottle:
            # AutoThrottle (allowed with RESILIENCE_THROTTLE_ENABLED = False)
            # owns slot delays and changes them; they are not floors then.
            return
        slot = engine.downloader.slots.get(request.meta.get("download_slot", ""))
        if slot is not None and slot.delay:
            state = self.domain(request.meta["download_slot"])
            state.floor_delay = max(state.floor_delay, slot.delay)
            slot.delay = 0.0

    # Circuit transitions

    def _on_transition(self, key: str, transition: Transition) -> None:
        spider = self.crawler.spider
        state = self.registry.peek(key)
        event = transition.event
        self.stats.inc_value(f"resilience/circuit/{event}")
        if event == "opened":
            logger.info(
                "Circuit opened for %(domain)s for %(seconds).1fs "
                "(%(reason)s, open number %(reopens)d)",
                {
                    "domain": key,
                    "seconds": transition.open_seconds,
                    "reason": transition.reason,
                    "reopens": transition.reopens,
                },
                extra={"spider": spider},
            )
            self._send(
                resilience_signals.circuit_opened,
                domain=key,
                open_seconds=transition.open_seconds,
                reason=transition.reason,
                reopens=transition.reopens,
            )
            if state is not None:
                self.wake_at(state.circuit.open_until)
        elif event == "half_opened":
            logger.info(
                "Circuit half-open for %(domain)s: probing",
                {"domain": key},
                extra={"spider": spider},
            )
            self._send(resilience_signals.circuit_half_opened, domain=key)
            self.wake_soon()
        elif event == "closed":
            logger.info("Circuit closed for %(domain)s", {"domain": key}, extra={"spider": spider})
            self._send(resilience_signals.circuit_closed, domain=key)
            self.wake_soon()
        elif event == "given_up":
            self._give_up(key, transition.reason)

    def _give_up(self, key: str, reason: str) -> None:
        held = self.hold.release_all(key)
        self.given_up[key] = reason
        logger.error(
            "Giving up on %(domain)s: %(reason)s; %(held)d held requests and any later "
            "ones for it fail with CircuitOpenError",
            {"domain": key, "reason": reason, "held": held},
            extra={"spider": self.crawler.spider},
        )
        self._send(resilience_signals.domain_given_up, domain=key, reason=reason, held=held)

    def _send(self, signal: object, **kwargs: Any) -> None:
        self.crawler.signals.send_catch_log(signal, **kwargs)


def _call_later(delay: float, function: Callable[[], None]) -> Any:
    """Schedule ``function`` on the running reactor in ``delay`` seconds."""
    # Imported here: the reactor is installed when the crawl starts.
    from twisted.internet import reactor  # noqa: PLC0415
    from twisted.internet.base import ReactorBase  # noqa: PLC0415

    return cast(ReactorBase, reactor).callLater(delay, function)
