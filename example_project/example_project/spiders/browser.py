"""Spider ``browser``: render pages whose content is written by JavaScript, with
scrapy-playwright and a real Chromium.

Only this spider downloads through the browser: its ``custom_settings`` install
scrapy-playwright's download handlers and the asyncio reactor that they need, so the
other spiders of the project keep Scrapy's own HTTP handler.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

from scrapy.http import Response

from example_project.spiders.docs import (
    DocsSpider,
    is_same_origin,
)

#: Debian's ``chromium`` package installs the browser binary here;
#: ``/usr/bin/chromium`` is a wrapper script that Playwright cannot drive.
#: The ``CHROMIUM_EXECUTABLE`` environment variable names another Chromium build.
CHROMIUM_EXECUTABLE = os.environ.get("CHROMIUM_EXECUTABLE", "/usr/lib/chromium/chromium")

#: Chromium flags for a crawl on a machine without a display. The last three stop
#: Chromium's own traffic to Google services (component updates, sync, field trials),
#: which a crawl kept on loopback must never send.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Launch options of ``PLAYWRIGHT_LAUNCH_OPTIONS``. Playwright adds ``--no-sandbox``
#: by itself when it runs as root.
LAUNCH_OPTIONS: dict[str, Any] = {
    "executable_path": CHROMIUM_EXECUTABLE,
    "headless": True,
    "args": CHROMIUM_ARGS,
}

#: The part of the fault site whose pages are written by inline scripts.
JS_SECTION = "/js/"


class BrowserSpider(DocsSpider):
    """Render the JavaScript pages of one or more hosts and yield
    ``{"url", "title", "text"}`` per page, as the browser shows them.

    Spider arguments (one is required):

    - ``urls``: comma-separated start URLs;
    - ``site``: path of a fault site's ready file; each host is entered through
      ``/js/index.html``.

    Links are followed when they stay on the page's origin and under ``/js/``.
    """

    name = "browser"
    entry_page = JS_SECTION + "index.html"
    request_meta: ClassVar[dict[str, Any]] = {"playwright": True}

    custom_settings: ClassVar[dict[str, Any]] = {
        "DOWNLOAD_HANDLERS": {
            "http": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
            "https": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
        },
        "TWISTED_REACTOR": "twisted.internet.asyncioreactor.AsyncioSelectorReactor",
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
        "PLAYWRIGHT_LAUNCH_OPTIONS": LAUNCH_OPTIONS,
        # At most 3 pages open at once, which bounds the renderer processes.
        "PLAYWRIGHT_MAX_PAGES_PER_CONTEXT": 3,
        # Scrapy would send more requests than the browser has pages for; the
        # surplus would only wait inside the handler for a free page.
        "CONCURRENT_REQUESTS": 3,
        # The memory guard measures the Scrapy process, the Node driver and every
        # Chromium process together. Three of the fault site's small pages took
        # them to about 670 MB of PSS (one run, Chromium 156), so 1024 MB leaves
        # room for heavier real pages.
        "RESILIENCE_MEMORY_LIMIT_MB": 1024,
    }

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        """Yield the rendered page's item, then a request per new link under ``/js/``."""
        title = response.css("title::text").get(default="").strip()
        text = response.css("#js-text::text").get(default="").strip()
        yield {"url": response.url, "title": title, "text": text}

        for link in self.link_extractor.extract_links(response):
            if is_same_origin(link.url, response.url) and JS_SECTION in link.url:
                request = self._request(link.url)
                if request is not None:
                    yield request
