"""Signals sent by scrapy-resilience.

Each is sent through ``crawler.signals`` with keyword arguments; those about
one domain include ``domain`` (the domain key, by default Scrapy's download
slot key, that is the hostname).

Connect to them like to Scrapy's own signals::

    crawler.signals.connect(handler, signal=scrapy_resilience.signals.circuit_opened)
"""

#: A domain's circuit opened. Arguments: ``domain``, ``open_seconds``,
#: ``reason`` (``"consecutive"``, ``"failure_rate"`` or ``"probe_failed"``),
#: ``reopens`` (opens since it was last closed, 1 for the first).
circuit_opened = object()

#: A domain's open time ended and it admits probe requests. Arguments: ``domain``.
circuit_half_opened = object()

#: A probe succeeded and the domain's circuit closed. Arguments: ``domain``.
circuit_closed = object()

#: The bundle stopped trying a domain for the rest of the crawl. Arguments:
#: ``domain``, ``reason``, ``held`` (requests failed with
#: :exc:`~scrapy_resilience.CircuitOpenError` at that moment).
domain_given_up = object()

#: The memory guard changed the downloader's concurrency. Arguments:
#: ``old_concurrency``, ``new_concurrency``, ``memory_mb``, ``limit_mb``.
memory_pressure_changed = object()
