"""Classify download failures into categories that drive retries and circuits.

Exceptions are matched by the fully qualified names (module and qualname) of
the classes in their MRO, so this module imports neither Scrapy nor Twisted
and also recognizes classes of libraries that are not installed, such as
Playwright, httpx or an older Scrapy.

Scrapy 2.13 and 2.14 pass Twisted's exceptions to ``process_exception``.
Scrapy 2.15 and later wrap the common ones in their own
(``DownloadTimeoutError``, ``DownloadConnectionRefusedError``,
``CannotResolveHostError``, ``DownloadFailedError``,
``ResponseDataLossError``), but others, such as ``ConnectionLost`` or
``TCPTimedOutError``, still arrive unwrapped. Both sets are listed here.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator

_IGNORE_REQUEST = "scrapy.exceptions.IgnoreRequest"

_PLAYWRIGHT_ERRORS = frozenset(
    {
        "playwright._impl._errors.Error",
        # Older Playwright releases defined their errors in this module.
        "playwright._impl._api_types.Error",
    }
)


class Category(str, enum.Enum):
    """Kind of download failure.

    ``CONTENT`` marks a response that a content check rejected. That check
    assigns it, and the functions of this module never return it.
    """

    NETWORK = "network"
    TIMEOUT = "timeout"
    SERVER = "server"
    THROTTLED = "throttled"
    CONTENT = "content"


# Checked before the network names, because several timeouts subclass a
# network error: Twisted's TimeoutError and TCPTimedOutError are ConnectError
# subclasses, and the builtin TimeoutError is an OSError.
_TIMEOUT_NAMES = frozenset(
    {
        "scrapy.exceptions.DownloadTimeoutError",
        "twisted.internet.error.TimeoutError",
        "twisted.internet.error.TCPTimedOutError",
        "twisted.internet.defer.TimeoutError",
        # Scrapy's HTTP/1.1 handler cancels the download on timeout and
        # raises a timeout error in place of the cancellation, so a cancelled
        # connection attempt that still arrives was cut short by another timer.
        # NOTE: a crawl that is stopping may also cancel connection attempts.
        "twisted.internet.error.ConnectingCancelledError",
        "builtins.TimeoutError",
        # asyncio's and concurrent.futures' own classes on Python 3.10. From
        # 3.11 both are the builtin TimeoutError.
        "asyncio.exceptions.TimeoutError",
        "concurrent.futures._base.TimeoutError",
        # Playwright's public playwright.async_api.TimeoutError and
        # playwright.sync_api.TimeoutError are these classes.
        "playwright._impl._errors.TimeoutError",
        "playwright._impl._api_types.TimeoutError",
        # Scrapy 2.19's httpx and aiohttp download handlers wrap their errors
        # in Scrapy's own, and this name catches one that gets through.
        # aiohttp's timeouts subclass the builtin TimeoutError.
        "httpx._exceptions.TimeoutException",
    }
)

# Not listed, so classified as None: Scrapy's DownloadCancelledError (2.15+)
# and Twisted's CancelledError (2.13, 2.14) raised by the handler when a body
# exceeds DOWNLOAD_MAXSIZE, which a retry would not fix. Stock Scrapy does not
# retry them either.
_NETWORK_NAMES = frozenset(
    {
        # Scrapy 2.15 and later.
        "scrapy.exceptions.DownloadConnectionRefusedError",
        "scrapy.exceptions.CannotResolveHostError",
        "scrapy.exceptions.DownloadFailedError",
        "scrapy.exceptions.ResponseDataLossError",
        # A proxy refused or failed the CONNECT tunnel.
        "scrapy.core.downloader.handlers.http11.TunnelError",
        # Twisted, as Scrapy 2.13 and 2.14 pass them on. ConnectError covers
        # ConnectionRefusedError, NoRouteError, SSLError and the other
        # connection failures, and DNSLookupError is an OSError.
        "twisted.internet.error.ConnectError",
        "twisted.internet.error.DNSLookupError",
        "twisted.internet.error.ConnectionDone",
        "twisted.internet.error.ConnectionLost",
        "twisted.web._newclient.ResponseFailed",
        "twisted.web._newclient.RequestTransmissionFailed",
        "twisted.web._newclient.RequestNotSent",
        # twisted.web.client re-exports the class above. Its name is listed
        # too in case a Twisted version defines a class there.
        "twisted.web.client.ResponseFailed",
        "twisted.web.http._DataLoss",
        "twisted.web.http.PotentialDataLoss",
        # TLS handshake and certificate failures.
        "OpenSSL.SSL.Error",
        # Scrapy retries OSError because HttpCompressionMiddleware raises it
        # on an empty compressed body. ConnectionError is an OSError subclass.
        "builtins.ConnectionError",
        "builtins.OSError",
        # Transport errors of the httpx and aiohttp download handlers.
        "httpx._exceptions.NetworkError",
        "httpx._exceptions.RemoteProtocolError",
        "httpx._exceptions.ProxyError",
        "aiohttp.client_exceptions.ClientConnectionError",
        "aiohttp.client_exceptions.ClientPayloadError",
    }
)

# Inside the reasons of a Twisted ResponseFailed, a CancelledError counts as a
# timeout, because download handlers cancel a request in flight on timeout.
_WRAPPED_TIMEOUT_NAMES = _TIMEOUT_NAMES | {"twisted.internet.defer.CancelledError"}

# Message fragments of Chromium ("net::ERR_...") and Firefox ("NS_ERROR_...")
# network errors that Playwright raises from page.goto(). Other codes, such
# as net::ERR_ABORTED for a navigation that turned into a download, are not
# failures of the site.
_BROWSER_TIMEOUT_MARKERS = (
    "net::err_timed_out",
    "net::err_connection_timed_out",
    "ns_error_net_timeout",
)
_BROWSER_NETWORK_MARKERS = (
    "net::err_connection_",
    "net::err_name_not_resolved",
    "net::err_name_resolution_failed",
    "net::err_address_unreachable",
    "net::err_internet_disconnected",
    "net::err_network_changed",
    "net::err_empty_response",
    "net::err_ssl_",
    "net::err_cert_",
    "net::err_http2_",
    "net::err_quic_protocol_error",
    "net::err_tunnel_connection_failed",
    "net::err_proxy_connection_failed",
    "net::err_content_length_mismatch",
    "net::err_incomplete_chunked_encoding",
    "ns_error_connection_refused",
    "ns_error_unknown_host",
    "ns_error_net_reset",
    "ns_error_net_interrupt",
    "ns_error_proxy_connection_refused",
)

# Message fragments of Playwright errors raised because the browser side
# crashed or closed, not because the site failed.
_BROWSER_FAULT_MARKERS = (
    "target crashed",
    "page crashed",
    "target page, context or browser has been closed",
    "browser has been closed",
    "target closed",
)

# Bound on the nesting of wrapped failures that is searched for a timeout.
_MAX_WRAP_DEPTH = 4


def classify_exception(
    exc: BaseException, extra_network: tuple[type[BaseException], ...] = ()
) -> Category | None:
    """Return the category of a download exception, or None for other exceptions.

    None is returned for ``IgnoreRequest`` and its subclasses, for a browser
    crash (see :func:`is_browser_fault`), and for any exception that is
    neither a known download failure nor an instance of ``extra_network``
    (the caller passes the ``RETRY_EXCEPTIONS`` classes it does not know).

    A timeout wins over a network failure. So a known network wrapper, such
    as Twisted's ``ResponseNeverReceived`` or Scrapy's ``DownloadFailedError``,
    is a timeout when one of its ``reasons`` or its ``__cause__`` is one.
    """
    names = _mro_names(exc)
    if _IGNORE_REQUEST in names or is_browser_fault(exc):
        return None

    if names & _TIMEOUT_NAMES:
        return Category.TIMEOUT
    if names & _PLAYWRIGHT_ERRORS:
        category = _classify_browser_message(exc)
        if category is not None:
            return category

    if names & _NETWORK_NAMES or isinstance(exc, extra_network):
        if _wraps_timeout(exc, _MAX_WRAP_DEPTH):
            return Category.TIMEOUT
        return Category.NETWORK
    return None


def classify_status(
    status: int, has_retry_after: bool, retry_http_codes: Collection[int]
) -> Category | None:
    """Return the category of a response status, or None when it is no failure.

    429 is always throttled, and so is 503 with a ``Retry-After`` header.
    Otherwise a status in ``retry_http_codes`` (Scrapy's ``RETRY_HTTP_CODES``,
    which includes 408 and several 5xx by default) is a server failure.
    """
    if status == 429 or (status == 503 and has_retry_after):
        return Category.THROTTLED
    if status in retry_http_codes:
        return Category.SERVER
    return None


def is_ignore_request(exc: BaseException) -> bool:
    """Return whether ``exc`` is Scrapy's ``IgnoreRequest`` or a subclass of it."""
    return _IGNORE_REQUEST in _mro_names(exc)


def is_browser_fault(exc: BaseException) -> bool:
    """Return whether ``exc`` is a Playwright error raised by a browser crash.

    These are Playwright's ``TargetClosedError`` and Playwright errors whose
    message reports a crashed target or page, or a closed page, context or
    browser. Such a failure is no evidence that the site failed, so it must
    not count against the site's circuit.
    """
    names = _mro_names(exc)
    if not names & _PLAYWRIGHT_ERRORS:
        return False
    if "playwright._impl._errors.TargetClosedError" in names:
        return True

    message = str(exc).lower()
    return any(marker in message for marker in _BROWSER_FAULT_MARKERS)


def _mro_names(exc: BaseException) -> frozenset[str]:
    return frozenset(f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__)


def _classify_browser_message(exc: BaseException) -> Category | None:
    message = str(exc).lower()
    if any(marker in message for marker in _BROWSER_TIMEOUT_MARKERS):
        return Category.TIMEOUT
    if any(marker in message for marker in _BROWSER_NETWORK_MARKERS):
        return Category.NETWORK
    return None


def _wraps_timeout(exc: BaseException, depth: int) -> bool:
    """Return whether a reason or cause of ``exc``, at any depth, is a timeout."""
    if depth <= 0:
        return False

    for inner in _wrapped_exceptions(exc):
        if _mro_names(inner) & _WRAPPED_TIMEOUT_NAMES:
            return True
        if _wraps_timeout(inner, depth - 1):
            return True
    return False


def _wrapped_exceptions(exc: BaseException) -> Iterator[BaseException]:
    """Yield the exceptions that ``exc`` wraps.

    These are the values of the Twisted Failures in ``exc.reasons`` (set by
    ``ResponseFailed`` and its subclasses) and the explicit ``__cause__``
    (set by Scrapy 2.15+ when it wraps a Twisted exception).
    """
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, (list, tuple)):
        for reason in reasons:
            # A Twisted Failure keeps the exception in .value.
            value = getattr(reason, "value", reason)
            if isinstance(value, BaseException):
                yield value

    if exc.__cause__ is not None:
        yield exc.__cause__
