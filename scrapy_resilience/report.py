"""The end-of-crawl report: per-domain detail that does not belong in stats."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrapy import Spider

    from scrapy_resilience.core.registry import DomainState
    from scrapy_resilience.runtime import Runtime

logger = logging.getLogger(__name__)

STATS_PREFIXES = ("resilience/", "retry/")


def build_report(runtime: Runtime, spider: Spider, reason: str) -> dict[str, Any]:
    """Return the report as a JSON-friendly dict.

    Each callable of ``runtime.report_extenders`` adds its fields to every
    domain's dict, and healthy domains beyond
    ``RESILIENCE_REPORT_MAX_HEALTHY_DOMAINS`` are left out (see
    :func:`bound_healthy_domains`).
    """
    stats = runtime.stats.get_stats()
    domains: dict[str, Any] = {}
    for state in runtime.registry:
        circuit = state.circuit
        if not (state.attempts or state.held or circuit.given_up or state.rejected):
            continue
        fields = domains[state.key] = domain_fields(runtime, state)
        fields["held_at_close"] = sum(
            1 for item in runtime.unfinished if item["domain"] == state.key
        )
    omitted = bound_healthy_domains(domains, runtime.config.report_max_healthy_domains)
    return {
        "spider": spider.name,
        "finish_reason": reason,
        "elapsed_seconds": round(runtime.clock() - runtime.started, 3),
        "stats": {
            key: _jsonable(value)
            for key, value in sorted(stats.items())
            if key.startswith(STATS_PREFIXES)
        },
        "domains": domains,
        "healthy_domains_omitted": omitted,
        "domains_evicted": runtime.registry.evicted,
        "unfinished": runtime.unfinished,
    }


def domain_fields(runtime: Runtime, state: DomainState) -> dict[str, Any]:
    """Return one domain's report fields: the registry's, then every extender's."""
    circuit = state.circuit
    fields: dict[str, Any] = {
        "state": circuit.state.value,
        "given_up": circuit.given_up,
        "give_up_reason": circuit.give_up_reason,
        "attempts": state.attempts,
        "successes": state.successes,
        "failures": dict(state.failures or {}),
        "circuit_opened": circuit.times_opened,
        "rejected": state.rejected,
    }
    for extend in runtime.report_extenders:
        extend(state.key, fields)
    return fields


def bound_healthy_domains(domains: dict[str, Any], max_healthy: int) -> dict[str, int]:
    """Remove all but the ``max_healthy`` busiest healthy domains from ``domains``.

    A domain is healthy when it has no failure, was not given up, had no
    request rejected and left nothing held at close. Every other domain is
    kept. Return the count and the attempts of the domains removed.
    """
    healthy = [
        key
        for key, fields in domains.items()
        if not (
            fields["failures"]
            or fields["given_up"]
            or fields["rejected"]
            or fields["held_at_close"]
        )
    ]
    healthy.sort(key=lambda key: domains[key]["attempts"], reverse=True)
    removed = healthy[max_healthy:]
    attempts = sum(domains.pop(key)["attempts"] for key in removed)
    return {"domains": len(removed), "attempts": attempts}


def report_path(template: str, spider: Spider) -> Path:
    """Return the report's path with its placeholders filled in.

    As in Scrapy's feed URIs, ``%(name)s`` is the spider name and ``%(time)s``
    the UTC time the report is written (``2026-12-04T21-30-00``, safe in file
    names). ``%(spider)s`` is the spider name too. ``%(job)s`` is Scrapyd's
    job id (see :func:`scrapyd_job_id`), or the spider name outside Scrapyd.
    """
    now = datetime.now(timezone.utc).replace(microsecond=0)
    values = {
        "name": spider.name,
        "spider": spider.name,
        "time": now.isoformat().replace("+00:00", "").replace(":", "-"),
        "job": scrapyd_job_id(spider) or spider.name,
    }
    return Path(template % values)


def scrapyd_job_id(spider: Spider) -> str | None:
    """Return the Scrapyd job id of the crawl, or None outside Scrapyd.

    Scrapyd passes the job id to every job as the ``_job`` spider argument,
    which ``Spider.__init__`` stores as an attribute (checked on Scrapyd 1.6.0,
    which sets no job environment variable). Older releases also set the
    ``SCRAPY_JOB`` environment variable, read when the attribute is missing.
    """
    job = getattr(spider, "_job", None) or os.environ.get("SCRAPY_JOB")
    return str(job) if job else None


def write_report(runtime: Runtime, spider: Spider, reason: str) -> None:
    """Write the report to ``RESILIENCE_REPORT_FILE`` when it is set."""
    template = runtime.config.report_file
    if not template:
        return
    try:
        path = report_path(template, spider)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = build_report(runtime, spider, reason)
        path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    except (OSError, TypeError, ValueError, KeyError) as error:
        logger.error(
            "Failed to write the resilience report to %(path)s: %(error)s",
            {"path": template, "error": error},
            extra={"spider": spider},
        )
        return
    logger.info(
        "Wrote the resilience report to %(path)s", {"path": str(path)}, extra={"spider": spider}
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
