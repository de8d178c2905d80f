"""Pages the site serves: a directory tree, or a generated site, plus JavaScript pages.

Every host of a site serves the same content. A directory root is read lazily and
each file is cached in memory after its first read. The generated site is a fixed
tree that depends only on its page count, so ``reachable_pages`` can rebuild it.
"""

from __future__ import annotations

import mimetypes
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from faultsite.faults import unit_hash

#: The Python documentation installed by Debian's ``python3-doc`` package.
DOCS_ROOT = Path("/usr/share/doc/python3/html")

#: The ``root`` value that selects the generated site.
GENERATED = "generated"

#: The prefix of the pages whose visible content is written by inline JavaScript.
JS_PREFIX = "/js/"

# The built-in table only, so content types do not depend on the machine's
# /etc/mime.types.
_MIME_TYPES = mimetypes.MimeTypes(filenames=())

_TEXT_TYPES = ("application/javascript", "application/json", "application/xml")

_WORDS = (
    *("circuit", "breaker", "retry", "backoff", "jitter", "domain", "request"),
    *("response", "latency", "throttle", "crawl", "spider", "page", "link"),
    *("index", "queue", "budget", "window", "token", "bucket", "timeout"),
    *("refused", "reset", "delay", "limit", "header", "server", "client"),
)

_CHILDREN_PER_PAGE = 3
_SECTIONS = 6


@dataclass(frozen=True)
class Page:
    """One resource: its bytes and the value of its ``Content-Type`` header."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class Redirect:
    """A directory requested without its trailing slash, sent to ``location``."""

    location: str


def content_type_for(name: str) -> str:
    """Return the ``Content-Type`` for a file name, with a UTF-8 charset for text."""
    guessed, _encoding = _MIME_TYPES.guess_type(name, strict=False)
    content_type = guessed or "application/octet-stream"
    if content_type.startswith("text/") or content_type in _TEXT_TYPES:
        content_type += "; charset=utf-8"
    return content_type


def js_page_title(number: int) -> str:
    """Return the title that the script of JavaScript page ``number`` sets."""
    return f"JS page {number}"


def js_page_text(number: int) -> str:
    """Return the paragraph text that the script of JavaScript page ``number`` writes.

    The raw HTML does not contain this text, so only a client that runs the script
    (a real browser) sees it.
    """
    return f"Rendered by script on page {number}"


class SiteContent:
    """Pages of one site, looked up by request target.

    ``root`` is a directory, or None for the generated site of ``pages`` pages.
    ``js_pages`` JavaScript pages are served under ``/js/`` in both cases.
    """

    def __init__(self, root: Path | None, pages: int = 200, js_pages: int = 10) -> None:
        self.root = root
        self.pages = pages
        self.js_pages = js_pages
        self._cache: dict[str, Page] = {}
        self._generated: dict[str, Page] = {}
        self._generated_dirs: set[str] = set()

        if root is None:
            self._generated = generate_site(pages)
            self._generated_dirs = _parent_dirs(self._generated)

        js_site = generate_js_pages(js_pages)
        self._js = {JS_PREFIX + name: page for name, page in js_site.items()}

    @classmethod
    def from_root(cls, root: Path | str, pages: int = 200, js_pages: int = 10) -> SiteContent:
        """Build the content for a ``root`` value: a directory or ``"generated"``."""
        if str(root) == GENERATED:
            return cls(None, pages=pages, js_pages=js_pages)
        return cls(Path(root), pages=pages, js_pages=js_pages)

    def lookup(self, target: str) -> Page | Redirect | None:
        """Return the page for a request target, a redirect for a directory, or None.

        ``/`` and any path ending in ``/`` serve that folder's ``index.html``. Paths are
        percent-decoded and normalized, so ``..`` cannot climb above the root. A
        target that names no file returns None (a 404).
        """
        path = _clean_path(target)
        if path is None:
            return None

        if path == JS_PREFIX.rstrip("/"):
            return Redirect(JS_PREFIX)
        if path.startswith(JS_PREFIX):
            return self._js.get(_with_index(path))

        if self.root is None:
            return self._lookup_generated(path)
        return self._lookup_file(path)

    def _lookup_generated(self, path: str) -> Page | Redirect | None:
        page = self._generated.get(_with_index(path))
        if page is not None:
            return page
        if path in self._generated_dirs:
            return Redirect(path + "/")
        return None

    def _lookup_file(self, path: str) -> Page | Redirect | None:
        key = _with_index(path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached

        assert self.root is not None
        file_path = self.root / key.lstrip("/")
        if file_path.is_file():
            try:
                body = file_path.read_bytes()
            except OSError:
                # Unreadable (permissions, removed meanwhile): serve it as missing.
                return None
            page = Page(body, content_type_for(file_path.name))
            self._cache[key] = page
            return page
        if not path.endswith("/") and file_path.is_dir():
            return Redirect(path + "/")
        return None


def _clean_path(target: str) -> str | None:
    """Return the decoded, normalized path of a target, or None if it is not a path."""
    raw_path = urlsplit(target).path
    if not raw_path.startswith("/"):
        return None

    decoded = unquote(raw_path)
    normalized = posixpath.normpath(decoded)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    if ".." in normalized.split("/") or "\x00" in normalized:
        return None

    # normpath drops a trailing slash, which decides between a folder's index page
    # and a redirect.
    if decoded.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized


def _with_index(path: str) -> str:
    return path + "index.html" if path.endswith("/") else path


def _parent_dirs(pages: dict[str, Page]) -> set[str]:
    dirs: set[str] = set()
    for path in pages:
        parent = posixpath.dirname(path)
        while parent not in ("", "/"):
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    return dirs


def generated_path(number: int) -> str:
    """Return the URL path of page ``number`` (0 is ``/index.html``) of the generated site."""
    if number == 0:
        return "/index.html"
    section = (number - 1) % _SECTIONS + 1
    return f"/section-{section}/page-{number}.html"


def generate_site(pages: int) -> dict[str, Page]:
    """Build the generated site: ``pages`` HTML pages keyed by URL path.

    Pages form a tree from ``/index.html`` (page ``n`` links to pages ``3n+1`` to
    ``3n+3``), so every page is reachable from the index. Each page also links to
    its parent, the index, one other page picked by a hash, and itself with a
    fragment. Every seventh page links to a missing page (a 404), and the index
    links to two outside sites that a crawler confined to its host must skip.
    """
    if pages < 1:
        raise ValueError(f"pages must be at least 1, got {pages}")
    return {generated_path(number): _generated_page(number, pages) for number in range(pages)}


def _generated_page(number: int, pages: int) -> Page:
    path = generated_path(number)
    title = f"Generated page {number}"
    links: list[tuple[str, str]] = []

    children = range(_CHILDREN_PER_PAGE * number + 1, _CHILDREN_PER_PAGE * number + 4)
    links.extend((generated_path(child), f"Page {child}") for child in children if child < pages)
    if number > 0:
        parent = (number - 1) // _CHILDREN_PER_PAGE
        links.append((generated_path(parent), f"Up to page {parent}"))
        links.append((generated_path(0), "Index"))
    other = int(unit_hash("see-also", number) * pages)
    links.append((generated_path(other), f"See also page {other}"))
    links.append((path + "#top", "Top of this page"))
    if number % 7 == 3:
        links.append((f"/missing/page-{number}.html", "A page that does not exist"))

    items = [f'<li><a href="{_relative_href(path, href)}">{text}</a></li>' for href, text in links]
    if number == 0:
        items.append('<li><a href="https://www.example.com/">An outside site</a></li>')
        items.append('<li><a href="http://docs.example.org/guide.html">Another one</a></li>')

    paragraphs = "\n".join(f"<p>{_sentence(number, index)}</p>" for index in range(3))
    body = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<title>{title}</title>\n</head>\n<body>\n<h1 id="top">{title}</h1>\n'
        f"{paragraphs}\n<ul>\n" + "\n".join(items) + "\n</ul>\n</body>\n</html>\n"
    )
    return Page(body.encode("utf-8"), "text/html; charset=utf-8")


def _relative_href(source: str, target: str) -> str:
    target_path, hash_sign, fragment = target.partition("#")
    relative = posixpath.relpath(target_path, posixpath.dirname(source))
    return relative + hash_sign + fragment


def _sentence(number: int, index: int) -> str:
    count = 8 + int(unit_hash("length", number, index) * 10)
    words = [
        _WORDS[int(unit_hash("word", number, index, position) * len(_WORDS))]
        for position in range(count)
    ]
    return " ".join(words).capitalize() + "."


def generate_js_pages(count: int) -> dict[str, Page]:
    """Build ``index.html`` and ``1.html`` to ``<count>.html`` of the JavaScript section.

    Keys are names relative to ``/js/``. The index links every page with plain HTML;
    each page's title and paragraph are written by an inline script, assembled from
    pieces so the visible text never appears in the raw HTML.
    """
    pages = {"index.html": _js_index(count)}
    for number in range(1, count + 1):
        pages[f"{number}.html"] = _js_page(number)
    return pages


def _js_index(count: int) -> Page:
    items = "\n".join(
        f'<li><a href="{number}.html">{js_page_title(number)}</a></li>'
        for number in range(1, count + 1)
    )
    body = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>JavaScript pages</title>\n</head>\n<body>\n<h1>JavaScript pages</h1>\n"
        f"<ul>\n{items}\n</ul>\n</body>\n</html>\n"
    )
    return Page(body.encode("utf-8"), "text/html; charset=utf-8")


def _js_page(number: int) -> Page:
    # The title and text are joined from word lists at run time, so a client that
    # does not run scripts cannot find them in the HTML.
    title_words = js_page_title(number).rsplit(" ", 1)[0].split()
    text_words = js_page_text(number).rsplit(" ", 1)[0].split()
    script = (
        "(function () {\n"
        f"  var number = {number};\n"
        f"  var titleWords = {_js_array(title_words)};\n"
        f"  var textWords = {_js_array(text_words)};\n"
        '  document.title = titleWords.concat([String(number)]).join(" ");\n'
        '  var paragraph = document.createElement("p");\n'
        '  paragraph.id = "js-text";\n'
        '  paragraph.textContent = textWords.concat([String(number)]).join(" ");\n'
        '  document.getElementById("content").appendChild(paragraph);\n'
        "})();\n"
    )
    body = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<title></title>\n</head>\n<body>\n<main id="content"></main>\n'
        '<nav><a href="index.html">All JavaScript pages</a></nav>\n'
        f"<script>\n{script}</script>\n</body>\n</html>\n"
    )
    return Page(body.encode("utf-8"), "text/html; charset=utf-8")


def _js_array(words: list[str]) -> str:
    return "[" + ", ".join(f'"{word}"' for word in words) + "]"
