"""Run one real Scrapy crawl in a fresh process and write what happened as JSON.

Usage: ``python tests/crawlrunner.py SPEC.json``. Each crawl runs in its own
process because a Twisted reactor cannot be restarted; tests start it with
:func:`tests.conftest.run_crawl`.

The spec holds ``settings``, ``start`` (a list of URLs or request dicts),
``follow`` (follow links on the same host), ``retry_in_callback`` (a URL
substring whose first response is retried with
:func:`scrapy_resilience.get_retry_request`) and ``output``. The output holds
the spider's callbacks and errbacks, the attempts the client sent and the
answers it received (monotonic times, comparable with the fault site's log),
and the final stats.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import scrapy
from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.linkextractors import LinkExtractor

from scrapy_resilience import get_retry_request


class ProbeSpider(scrapy.Spider):
    name = "probe"

    def __init__(self, spec: dict[str, Any], record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.record = record
        self.link_extractor = LinkExtractor()
        self.retried: set[str] = set()

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> ProbeSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider._sent, signal=signals.request_reached_downloader)
        crawler.signals.connect(spider._received, signal=signals.response_received)
        return spider

    async def start(self) -> Any:
        for entry in self.spec["start"]:
            if isinstance(entry, str):
                entry = {"url": entry}
            yield scrapy.Request(
                entry["url"],
                meta=entry.get("meta", {}),
                priority=entry.get("priority", 0),
                dont_filter=entry.get("dont_filter", False),
                errback=self.errback,
            )

    def parse(self, response: Any) -> Any:
        self.record["callbacks"].append(
            {
                "url": response.url,
                "status": response.status,
                "time": time.monotonic(),
                "meta_keys": sorted(response.meta),
            }
        )
        marker = self.spec.get("retry_in_callback")
        if marker and marker in response.url and response.url not in self.retried:
            self.retried.add(response.url)
            retry = get_retry_request(response.request, spider=self, reason="callback retry")
            if retry is not None:
                self.record["callback_retries"].append(
                    {"url": response.url, "time": time.monotonic()}
                )
                yield retry
            return
        if not self.spec.get("follow"):
            return
        host = urlsplit(response.url).netloc
        for link in self.link_extractor.extract_links(response):
            if urlsplit(link.url).netloc == host:
                yield response.follow(link.url, errback=self.errback)

    def errback(self, failure: Any) -> None:
        request = failure.request
        self.record["errbacks"].append(
            {
                "url": request.url,
                "exception": type(failure.value).__name__,
                "category": request.meta.get("resilience_category"),
                "time": time.monotonic(),
            }
        )

    def _sent(self, request: Any, spider: Any) -> None:
        self.record["sent"].append({"url": request.url, "time": time.monotonic()})

    def _received(self, response: Any, request: Any, spider: Any) -> None:
        self.record["received"].append(
            {"url": response.url, "status": response.status, "time": time.monotonic()}
        )


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    record: dict[str, Any] = {
        "callbacks": [],
        "errbacks": [],
        "sent": [],
        "received": [],
        "callback_retries": [],
    }
    settings = {"LOG_LEVEL": "DEBUG", "TELNETCONSOLE_ENABLED": False, **spec["settings"]}
    process = CrawlerProcess(settings, install_root_handler=True)
    crawler = process.create_crawler(ProbeSpider)
    started = time.monotonic()
    process.crawl(crawler, spec=spec, record=record)
    process.start()
    record["started"] = started
    record["finished"] = time.monotonic()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    record["stats"] = {
        key: value if isinstance(value, (int, float, str)) else str(value)
        for key, value in stats.items()
    }
    Path(spec["output"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
