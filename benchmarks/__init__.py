"""Benchmarks: stock Scrapy against the scrapy-resilience bundle on the fault site.

Run them with ``make bench`` or ``python benchmarks/run.py`` (``--help`` lists the
options). Nothing here is part of the test suite.
"""
