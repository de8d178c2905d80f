"""The metrics of one crawl, from the fault site's request log and the crawl's record.

The site's log is the source of truth for what each host received. A host that
refuses connections (a dead host, or a recovering one in its failure window) logs
nothing for them. Its requests are therefore the attempts the client sent to it,
counted with ``request_reached_downloader``, which fires once per attempt that goes
to the download handler. For a recovering host that count includes the requests
the site logged once it listened. Times from the log and from the record are on the same
monotonic clock.

Every value is a number, a string or None (not applicable), so runs serialize to
JSON and medians are taken key by key.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from benchmarks.scenarios import Host, Size, build_hosts, page_paths
from scrapy_resilience.settings import DEFAULTS

#: Share of a rate-limited host's crawl, from its first request to its last served
#: one, after which it counts as settled. The bucket's initial burst and the
#: client's search for the allowed pace fall in the first half, whatever the
#: profile and however long it took.
SETTLE_SHARE = 0.5

#: Settled windows shorter than this give no figures, in seconds.
MIN_SETTLED_WINDOW = 2.0

REJECTION_STATUSES = (429, 503)


def dead_attempt_limit() -> int:
    """Return the bundle's default bound on attempts to a host that never responds:
    the circuit's failure threshold plus its half-open probes."""
    threshold = int(DEFAULTS["RESILIENCE_CIRCUIT_FAILURE_THRESHOLD"])
    return threshold + int(DEFAULTS["RESILIENCE_CIRCUIT_HALF_OPEN_PROBES"])


def tail_budget(download_timeout: float) -> float:
    """Return the seconds a crawl may run on after its last page and the faulty
    hosts' first circuit opening: open time x (1 + jitter) + timeout + 10 s."""
    open_seconds = float(DEFAULTS["RESILIENCE_CIRCUIT_OPEN_SECONDS"])
    jitter = float(DEFAULTS["RESILIENCE_CIRCUIT_OPEN_JITTER"])
    return open_seconds * (1 + jitter) + download_timeout + 10


def compute_metrics(
    size: Size,
    ready: dict[str, Any],
    log: list[dict[str, Any]],
    record: dict[str, Any] | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Return the metrics of one crawl.

    ``ready`` is the site's ready file, ``log`` its request log, ``record`` the
    crawl process's output (None when the process wrote none), ``settings`` the
    crawl's Scrapy settings.
    """
    hosts = build_hosts(size)
    hostnames = {
        name: urlsplit(entry["url"]).hostname or "" for name, entry in ready["hosts"].items()
    }
    by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        by_host[entry["host"]].append(entry)
    for entries in by_host.values():
        entries.sort(key=lambda entry: entry["arrival"])

    metrics: dict[str, Any] = {
        "pages_available": sum(len(page_paths(size)) for host in hosts if host.reachable),
        "hosts": len(hosts),
        "site_requests": len(log),
    }
    metrics.update(_server_metrics(hosts, by_host))
    if record is None:
        metrics["pages"] = None
        return metrics

    started = float(record["started"])
    attempts = sum(record["sent"].values())
    metrics.update(
        {
            "wall_s": record["finished"] - started,
            "attempts": attempts,
            "finish_reason": record["stats"].get("finish_reason"),
            "cpu_us_per_request": _per_request(_crawl_cpu_seconds(record) * 1e6, attempts),
            "bundle_cpu_us_per_request": (
                _per_request(record["bundle_cpu_ns"] / 1000, attempts)
                if record.get("bundle_cpu_ns") is not None
                else None
            ),
        }
    )
    metrics.update(_page_metrics(size, hosts, hostnames, record))
    metrics.update(_fate_metrics(record))
    metrics["sent_inside_retry_after"] = _sent_inside_windows(record)
    metrics.update(_faulty_requests(hosts, hostnames, by_host, record))
    metrics.update(_tail(hosts, hostnames, record, settings, metrics["last_item_at"]))
    metrics.update(_bundle_metrics(record))
    return metrics


def _crawl_cpu_seconds(record: dict[str, Any]) -> float:
    """Return the crawl process's CPU time from spider_opened to spider_closed, so
    interpreter and Scrapy start-up are left out."""
    if record.get("cpu_opened") is None or record.get("cpu_closed") is None:
        return 0.0
    return float(record["cpu_closed"] - record["cpu_opened"])


def _per_request(total: float, attempts: int) -> float | None:
    return total / attempts if attempts else None


def _page_metrics(
    size: Size, hosts: list[Host], hostnames: dict[str, str], record: dict[str, Any]
) -> dict[str, Any]:
    """Pages scraped of reachable hosts (distinct paths with a 200), last item, rate."""
    expected = set(page_paths(size))
    reachable = {hostnames[host.name]: host for host in hosts if host.reachable}
    scraped: set[tuple[str, str]] = set()
    last_item: float | None = None
    for _request_id, url, status, when in record["callbacks"]:
        parts = urlsplit(url)
        hostname = parts.hostname or ""
        if status != 200 or hostname not in reachable or parts.path not in expected:
            continue
        scraped.add((hostname, parts.path))
        last_item = when if last_item is None else max(last_item, when)

    started = float(record["started"])
    wall = record["finished"] - started
    pages = len(scraped)
    return {
        "pages": pages,
        "last_item_at": last_item,
        "last_item_s": None if last_item is None else last_item - started,
        "throughput_pps": pages / wall if wall > 0 else None,
    }


def _fate_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Requests the spider yielded that reached neither callback nor errback.

    In a crawl that ended by itself they are lost. In one closed by its time limit
    they are counted as unfinished instead, because the limit cut them off.
    """
    fates: Counter[int] = Counter()
    for entry in (*record["callbacks"], *record["errbacks"]):
        if entry[0] is not None:
            fates[int(entry[0])] += 1
    yielded = int(record["yielded"])
    without_fate = sum(1 for request_id in range(yielded) if request_id not in fates)
    finished = record["stats"].get("finish_reason") == "finished"
    return {
        "yielded": yielded,
        "lost": without_fate if finished else None,
        "unfinished": None if finished else without_fate,
        "duplicated": sum(1 for count in fates.values() if count > 1),
        "errbacks": len(record["errbacks"]),
    }


def _server_metrics(hosts: list[Host], by_host: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rejections, the gaps after them, Retry-After windows and settled rates."""
    gaps: list[float] = []
    inside = 0
    rejections = 0
    settled: list[float] = []
    settled_rejected: list[float] = []
    for host in hosts:
        entries = by_host.get(host.name, [])
        arrivals = [entry["arrival"] for entry in entries]
        rejected = [
            entry
            for entry in entries
            if entry["status"] in REJECTION_STATUSES and entry["answered"] is not None
        ]
        rejections += len(rejected)
        gaps.extend(_gaps_after(rejected, arrivals))
        inside += _inside_windows(rejected, arrivals)
        if host.profile == "rate_limited":
            window = _settled_window(entries)
            if window is not None:
                settled.append(_settled_ratio(entries, window, float(host.options["rate"])))
                settled_rejected.append(_settled_rejected_share(entries, window))

    return {
        "rejections": rejections,
        "min_gap_after_rejection_s": min(gaps) if gaps else None,
        "inside_retry_after": inside,
        "settled_rate_ratio": min(settled) if settled else None,
        "settled_rejected_share": max(settled_rejected) if settled_rejected else None,
    }


def _gaps_after(rejected: list[dict[str, Any]], arrivals: list[float]) -> Iterable[float]:
    """Yield, for each rejection, the time from its response to the host's next arrival."""
    for entry in rejected:
        index = bisect.bisect_right(arrivals, entry["answered"])
        if index < len(arrivals):
            yield arrivals[index] - entry["answered"]


def _inside_windows(rejected: list[dict[str, Any]], arrivals: list[float]) -> int:
    """Count arrivals inside any Retry-After window, each arrival once.

    A window runs from the moment the site finished writing the rejection to
    ``Retry-After`` seconds later. A request the client sent just before it read
    the rejection can land in the window, so on loopback a few such arrivals come
    from requests already in flight rather than from ignoring the header.
    """
    inside: set[int] = set()
    for entry in rejected:
        if entry["retry_after"] is None:
            continue
        start = entry["answered"]
        first = bisect.bisect_right(arrivals, start)
        last = bisect.bisect_left(arrivals, start + entry["retry_after"])
        inside.update(range(first, last))
    return len(inside)


def _sent_inside_windows(record: dict[str, Any]) -> int | None:
    """Count attempts the client sent inside a Retry-After window, on its own clock.

    Here a window starts when the client received the rejection, so a request that
    was already sent or in flight then does not count. Each attempt counts once.
    """
    if "sent_log" not in record:
        return None
    sends: dict[str, list[float]] = defaultdict(list)
    for host, when in record["sent_log"]:
        sends[host].append(when)
    for times in sends.values():
        times.sort()

    inside: set[tuple[str, int]] = set()
    for host, received, retry_after in record["rejections_received"]:
        times = sends.get(host, [])
        first = bisect.bisect_right(times, received)
        last = bisect.bisect_left(times, received + retry_after)
        inside.update((host, index) for index in range(first, last))
    return len(inside)


def _settled_window(entries: list[dict[str, Any]]) -> tuple[float, float] | None:
    """Return the settled part of a rate-limited host's crawl as (start, end)
    arrival times, or None when it is shorter than MIN_SETTLED_WINDOW.

    It starts SETTLE_SHARE of the way from the host's first arrival to its last
    served request, and ends at that request.
    """
    served = [float(entry["arrival"]) for entry in entries if entry["outcome"] == "served"]
    if not served:
        return None
    first = float(entries[0]["arrival"])
    end = served[-1]
    start = first + SETTLE_SHARE * (end - first)
    if end - start < MIN_SETTLED_WINDOW:
        return None
    return start, end


def _settled_ratio(
    entries: list[dict[str, Any]], window: tuple[float, float], rate: float
) -> float:
    """Return the served rate in the settled window, as a fraction of the allowed
    ``rate``. Every served request counts (404s and redirects take a token too)."""
    start, end = window
    count = sum(
        1 for entry in entries if entry["outcome"] == "served" and start <= entry["arrival"] <= end
    )
    return count / (end - start) / rate


def _settled_rejected_share(entries: list[dict[str, Any]], window: tuple[float, float]) -> float:
    """Return the share of the requests arriving in the settled window that
    were rejected with 429 or 503."""
    start, end = window
    arrived = [entry for entry in entries if start <= entry["arrival"] <= end]
    rejected = [entry for entry in arrived if entry["status"] in REJECTION_STATUSES]
    return len(rejected) / len(arrived)


def _faulty_requests(
    hosts: list[Host],
    hostnames: dict[str, str],
    by_host: dict[str, list[dict[str, Any]]],
    record: dict[str, Any],
) -> dict[str, Any]:
    """Requests each faulty host received, and the most any dead or blackhole got."""
    per_host: dict[str, int] = {}
    for host in hosts:
        if not host.faulty:
            continue
        if _refuses_connections(host):
            per_host[host.name] = int(record["sent"].get(hostnames[host.name], 0))
        else:
            per_host[host.name] = len(by_host.get(host.name, []))

    unreachable = [per_host[host.name] for host in hosts if host.faulty and not host.reachable]
    return {
        "faulty_requests": sum(per_host.values()) if per_host else None,
        "faulty_requests_by_host": per_host or None,
        "max_dead_attempts": max(unreachable) if unreachable else None,
    }


def _refuses_connections(host: Host) -> bool:
    if host.profile == "dead":
        return True
    return host.profile == "recovering" and host.options.get("fail_mode", "refuse") == "refuse"


def _tail(
    hosts: list[Host],
    hostnames: dict[str, str],
    record: dict[str, Any],
    settings: dict[str, Any],
    last_item_at: float | None,
) -> dict[str, Any]:
    """Seconds from the later of the last item and the dead and blackhole hosts'
    first circuit opening to the crawl's end, with the target's budget.

    Without circuits (stock Scrapy) the tail is measured from the last item only.
    """
    unreachable = {hostnames[host.name] for host in hosts if not host.reachable}
    if not unreachable or last_item_at is None:
        return {"tail_s": None, "tail_budget_s": None}

    first_open: dict[str, float] = {}
    for signal_name, domain, when in record["events"]:
        if signal_name == "circuit_opened" and domain in unreachable:
            first_open[domain] = min(first_open.get(domain, when), when)
    reference = max([last_item_at, *first_open.values()])
    return {
        "tail_s": record["finished"] - reference,
        "tail_budget_s": tail_budget(float(settings["DOWNLOAD_TIMEOUT"])),
    }


def _bundle_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Return the bundle's registry size per domain and its final throttle delays."""
    metrics: dict[str, Any] = {
        "registry_bytes_per_domain": None,
        "registry_traced_bytes_per_domain": None,
        "max_throttle_delay_s": None,
        "given_up_domains": None,
    }
    registry = record.get("registry")
    if registry and registry["domains"]:
        metrics["registry_bytes_per_domain"] = registry["bytes"] / registry["domains"]
        metrics["registry_traced_bytes_per_domain"] = (
            registry["synthetic_traced_bytes"] / registry["synthetic_domains"]
        )
    state = record.get("bundle_state")
    if state:
        metrics["max_throttle_delay_s"] = state["max_throttle_delay"]
        metrics["given_up_domains"] = len(state["given_up"])
    return metrics
