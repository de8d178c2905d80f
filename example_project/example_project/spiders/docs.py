"""Spider ``docs``: crawl every page of one or more hosts, one item per page."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urldefrag, urljoin, urlsplit

import scrapy
from scrapy.http import HtmlResponse, Response
from scrapy.linkextractors import LinkExtractor
from twisted.python.failure import Failure

logger = logging.getLogger(__name__)

#: Arguments of the spider's LinkExtractor. ``faultsite.reachable_pages`` builds
#: its extractor from them too, so the expected page count follows the same rules.
LINK_EXTRACTOR_ARGS: dict[str, Any] = {"tags": ("a",), "attrs": ("href",), "unique": True}


def build_link_extractor() -> LinkExtractor:
    """Return the link extractor that the spider follows links with."""
    return LinkExtractor(**LINK_EXTRACTOR_ARGS)


def count_failure(spider: scrapy.Spider, failure: Failure) -> None:
    """Count a failed request in the ``<spider name>/errback/<exception class>``
    stat and log it at DEBUG."""
    error_name = type(failure.value).__name__
    if spider.crawler.stats is not None:
        spider.crawler.stats.inc_value(f"{spider.name}/errback/{error_name}")
    request = getattr(failure, "request", None)
    logger.debug(
        "Request failed: %(url)s: %(error)s",
        {"url": getattr(request, "url", "?"), "error": repr(failure.value)},
    )


def is_same_origin(url: str, page_url: str) -> bool:
    """Return whether ``url`` has the scheme, hostname and port of ``page_url``."""
    target = urlsplit(url)
    page = urlsplit(page_url)
    try:
        same_port = target.port == page.port
    except ValueError:
        return False
    return target.scheme == page.scheme and target.hostname == page.hostname and same_port


def start_urls_from_ready_file(path: str | Path) -> list[str]:
    """Return the index page URL of every host in a fault site's ready file.

    No host is skipped: dead and blackhole hosts are entered too, which is the point
    of the fault site.
    """
    ready = json.loads(Path(path).read_text(encoding="utf-8"))
    return [urljoin(host["url"], "index.html") for host in ready["hosts"].values()]


class DocsSpider(scrapy.Spider):
    """Crawl whole sites and yield ``{"url", "title", "host"}`` for every HTML page.

    Spider arguments (one is required):

    - ``urls``: comma-separated start URLs;
    - ``site``: path of a fault site's ready file; each host is entered through its
      ``index.html``.

    Links are followed when they stay on the page's scheme, hostname and port.
    Failed requests reach ``record_failure``, which yields nothing but counts the
    failure in the ``docs/errback/<exception class>`` stat.
    """

    name = "docs"

    #: Page each host of a ready file is entered through, relative to the host.
    entry_page: ClassVar[str] = "index.html"
    #: Meta of every request the spider makes.
    request_meta: ClassVar[dict[str, Any]] = {}

    def __init__(self, urls: str | None = None, site: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        start_urls = [url.strip() for url in (urls or "").split(",") if url.strip()]
        if site:
            start_urls.extend(
                urljoin(url, self.entry_page) for url in start_urls_from_ready_file(site)
            )
        if not start_urls:
            raise ValueError(
                f"spider {self.name!r} needs a start: pass -a urls=URL[,URL...] "
                "or -a site=READY_FILE"
            )

        self.start_urls = start_urls
        self.link_extractor = build_link_extractor()
        # URLs already requested, without fragments. Index pages of the Python docs
        # link every page many times over (contents.html is 2.5 MB), and skipping
        # repeats here avoids building thousands of Requests the dupefilter drops.
        self.requested: set[str] = set()

    async def start(self) -> AsyncIterator[scrapy.Request]:
        """Yield a request for every start URL."""
        for url in self.start_urls:
            request = self._request(url)
            if request is not None:
                yield request

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        """Yield the page's item, then a request for each new same-origin link."""
        if not isinstance(response, HtmlResponse):
            return

        title = response.css("title::text").get(default="").strip()
        yield {"url": response.url, "title": title, "host": urlsplit(response.url).hostname}

        for link in self.link_extractor.extract_links(response):
            if is_same_origin(link.url, response.url):
                request = self._request(link.url)
                if request is not None:
                    yield request

    def record_failure(self, failure: Failure) -> None:
        """Count a failed request in stats and log it at DEBUG; yield no item."""
        count_failure(self, failure)

    def _request(self, url: str) -> scrapy.Request | None:
        url = urldefrag(url).url
        if url in self.requested:
            return None
        self.requested.add(url)
        return scrapy.Request(
            url, callback=self.parse, errback=self.record_failure, meta=dict(self.request_meta)
        )
