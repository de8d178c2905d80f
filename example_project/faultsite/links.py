"""The link closure of a site, computed offline with the example spider's rules."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

from faultsite.content import Page, Redirect, SiteContent

# A reserved name (RFC 2606) that stands for "the host": links are resolved against
# it and must stay on it, as the spider's links must stay on the page's host.
_ORIGIN = "http://faultsite.invalid"


def reachable_pages(root: Path | str, start: str = "index.html", *, pages: int = 200) -> set[str]:
    """Return the URL paths of the HTML pages reachable from ``start`` on one host.

    ``root`` is a content directory or ``"generated"`` (with ``pages`` pages). Links
    are extracted and filtered exactly as the ``docs`` spider does (its
    ``build_link_extractor`` and ``is_same_origin``), fragments are dropped, and
    redirects to a folder's index are followed. Only pages that exist and are HTML
    count: a link to a missing file is a 404, not a page. A path includes its query
    string when the link has one.

    Scrapy is imported here, not at module level, so the server runs without it.
    """
    from example_project.spiders.docs import (  # noqa: PLC0415
        build_link_extractor,
        is_same_origin,
    )
    from scrapy.http import HtmlResponse  # noqa: PLC0415

    content = SiteContent.from_root(root, pages=pages, js_pages=1)
    extractor = build_link_extractor()
    start_url = urljoin(_ORIGIN + "/", start)
    queued = {start_url}
    queue = deque([start_url])
    found: set[str] = set()

    while queue:
        url = queue.popleft()
        resource = content.lookup(_target(url))
        if isinstance(resource, Redirect):
            _enqueue(urljoin(url, resource.location), url, queued, queue, is_same_origin)
            continue
        if not isinstance(resource, Page) or not resource.content_type.startswith("text/html"):
            continue

        found.add(_target(url))
        headers = {"Content-Type": resource.content_type}
        response = HtmlResponse(url, body=resource.body, headers=headers)
        for link in extractor.extract_links(response):
            _enqueue(link.url, url, queued, queue, is_same_origin)

    return found


def _target(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def _enqueue(
    url: str,
    page_url: str,
    queued: set[str],
    queue: deque[str],
    same_origin: Callable[[str, str], bool],
) -> None:
    next_url = urldefrag(url).url
    if next_url not in queued and same_origin(next_url, page_url):
        queued.add(next_url)
        queue.append(next_url)
