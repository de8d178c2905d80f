"""A fault-injection web site for testing crawlers on loopback.

Run it with ``python -m faultsite`` (see ``faultsite.__main__``) or from Python with
``faultsite.testing.start_site``. The server needs only the standard library;
``reachable_pages`` imports Scrapy when called.
"""

from faultsite.config import ConfigError, HostConfig, SiteConfig, parse_config
from faultsite.content import (
    DOCS_ROOT,
    GENERATED,
    SiteContent,
    generate_site,
    generated_path,
    js_page_text,
    js_page_title,
)
from faultsite.faults import TokenBucket, fault_hits, flaky_fails, unit_hash
from faultsite.links import reachable_pages
from faultsite.profiles import BAN_MARKER

__all__ = [
    "BAN_MARKER",
    "DOCS_ROOT",
    "GENERATED",
    "ConfigError",
    "HostConfig",
    "SiteConfig",
    "SiteContent",
    "TokenBucket",
    "fault_hits",
    "flaky_fails",
    "generate_site",
    "generated_path",
    "js_page_text",
    "js_page_title",
    "parse_config",
    "reachable_pages",
    "unit_hash",
]
