"""Unit tests for failure classification, with real Scrapy and Twisted exceptions."""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import inspect

import pytest
from OpenSSL import SSL
from scrapy import exceptions as scrapy_exceptions
from scrapy.core.downloader.handlers.http11 import TunnelError
from scrapy.exceptions import (
    CloseSpider,
    IgnoreRequest,
    NotConfigured,
    NotSupported,
    StopDownload,
)
from scrapy.http import Response
from scrapy.settings import default_settings
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.misc import load_object
from twisted.internet import defer
from twisted.internet import error as tx_error
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss, _DataLoss

from scrapy_resilience.core import classify
from scrapy_resilience.core.classify import (
    Category,
    classify_exception,
    classify_status,
    is_browser_fault,
    is_ignore_request,
)

DEFAULT_RETRY_HTTP_CODES = tuple(default_settings.RETRY_HTTP_CODES)


def scrapy_exception(name: str) -> type[Exception]:
    """Return a download exception of Scrapy 2.15+, or a class with its qualified
    name on older Scrapy (classification matches by name, so both behave alike)."""
    found = getattr(scrapy_exceptions, name, None)
    if found is None:
        found = type(name, (Exception,), {"__module__": "scrapy.exceptions"})
    return found


CannotResolveHostError = scrapy_exception("CannotResolveHostError")
DownloadCancelledError = scrapy_exception("DownloadCancelledError")
DownloadConnectionRefusedError = scrapy_exception("DownloadConnectionRefusedError")
DownloadFailedError = scrapy_exception("DownloadFailedError")
DownloadTimeoutError = scrapy_exception("DownloadTimeoutError")
ResponseDataLossError = scrapy_exception("ResponseDataLossError")
UnsupportedURLSchemeError = scrapy_exception("UnsupportedURLSchemeError")


def fake_class(
    module: str, name: str, base: type[BaseException] = Exception
) -> type[BaseException]:
    """Create a class with the qualified name of a library that is not installed."""
    return type(name, (base,), {"__module__": module})


# Playwright is not a test dependency, so its classes are rebuilt by name,
# with the same hierarchy as playwright/_impl/_errors.py.
PlaywrightError = fake_class("playwright._impl._errors", "Error")
PlaywrightTimeoutError = fake_class("playwright._impl._errors", "TimeoutError", PlaywrightError)
PlaywrightTargetClosedError = fake_class(
    "playwright._impl._errors", "TargetClosedError", PlaywrightError
)
# Older Playwright releases.
OldPlaywrightError = fake_class("playwright._impl._api_types", "Error")
OldPlaywrightTimeoutError = fake_class(
    "playwright._impl._api_types", "TimeoutError", OldPlaywrightError
)


def test_module_imports_no_scrapy_or_twisted() -> None:
    tree = ast.parse(inspect.getsource(classify))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "scrapy" not in imported
    assert "twisted" not in imported


def test_category_values_are_strings() -> None:
    assert isinstance(Category.TIMEOUT, str)
    assert Category.TIMEOUT.value == "timeout"
    assert Category("network") is Category.NETWORK
    assert {c.value for c in Category} == {
        "network",
        "timeout",
        "server",
        "throttled",
        "content",
    }


# -- Timeouts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        DownloadTimeoutError("Getting http://a/ took longer than 1.0 seconds."),
        tx_error.TimeoutError(),
        tx_error.TCPTimedOutError(),
        defer.TimeoutError(),
        tx_error.ConnectingCancelledError(("127.0.0.1", 80)),
        TimeoutError(),
        asyncio.TimeoutError(),
        concurrent.futures.TimeoutError(),
        PlaywrightTimeoutError("Timeout 30000ms exceeded."),
        OldPlaywrightTimeoutError("Timeout 30000ms exceeded."),
    ],
    ids=lambda exc: type(exc).__module__ + "." + type(exc).__qualname__,
)
def test_timeouts(exc: BaseException) -> None:
    assert classify_exception(exc) is Category.TIMEOUT


def test_timeout_wins_over_network_parent() -> None:
    # Twisted's TimeoutError is a ConnectError and the builtin one an OSError,
    # and both of those are network failures.
    assert isinstance(tx_error.TimeoutError(), tx_error.ConnectError)
    assert isinstance(TimeoutError(), OSError)
    assert classify_exception(tx_error.TimeoutError()) is Category.TIMEOUT
    assert classify_exception(TimeoutError()) is Category.TIMEOUT


def test_timeout_subclass() -> None:
    class SlowSiteError(DownloadTimeoutError):
        pass

    class MixedError(ConnectionResetError, TimeoutError):
        pass

    assert classify_exception(SlowSiteError()) is Category.TIMEOUT
    assert classify_exception(MixedError()) is Category.TIMEOUT


# -- Network failures ------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        # Scrapy 2.15 and later.
        DownloadConnectionRefusedError("Connection was refused by other side"),
        CannotResolveHostError("DNS lookup failed"),
        DownloadFailedError("failed"),
        ResponseDataLossError(),
        TunnelError("Could not open CONNECT tunnel with proxy 127.0.0.1:8080"),
        # Twisted, as Scrapy 2.13 and 2.14 pass them on.
        tx_error.ConnectError(),
        tx_error.ConnectionRefusedError(),
        tx_error.DNSLookupError("no such host"),
        tx_error.NoRouteError(),
        tx_error.UnknownHostError(),
        tx_error.SSLError(),
        tx_error.ConnectionDone(),
        tx_error.ConnectionLost(),
        tx_error.ConnectionAborted(),
        ResponseFailed([Failure(tx_error.ConnectionLost())]),
        ResponseNeverReceived([Failure(tx_error.ConnectionDone())]),
        _newclient.RequestTransmissionFailed([Failure(tx_error.ConnectionLost())]),
        _newclient.RequestNotSent(),
        _DataLoss(),
        PotentialDataLoss(),
        SSL.Error([("SSL routines", "", "certificate verify failed")]),
        # Builtins: HttpCompressionMiddleware raises OSError on an empty body.
        ConnectionResetError(),
        ConnectionRefusedError(),
        BrokenPipeError(),
        ConnectionError(),
        OSError("Not a gzipped file"),
    ],
    ids=lambda exc: type(exc).__module__ + "." + type(exc).__qualname__,
)
def test_network_failures(exc: BaseException) -> None:
    assert classify_exception(exc) is Category.NETWORK


def test_network_subclass() -> None:
    class FlakyConnectionLost(tx_error.ConnectionLost):
        pass

    assert classify_exception(FlakyConnectionLost()) is Category.NETWORK


def test_response_failed_is_reexported_class() -> None:
    # twisted.web.client.ResponseFailed is the _newclient class, whose
    # qualified name is what the MRO shows.
    assert ResponseFailed is _newclient.ResponseFailed
    assert classify_exception(ResponseFailed([])) is Category.NETWORK


# -- Wrapped failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        tx_error.TimeoutError(),
        tx_error.TCPTimedOutError(),
        defer.TimeoutError(),
        defer.CancelledError(),
        TimeoutError(),
    ],
    ids=lambda exc: type(exc).__module__ + "." + type(exc).__qualname__,
)
def test_response_never_received_timeout_reason(reason: BaseException) -> None:
    exc = ResponseNeverReceived([Failure(reason)])
    assert classify_exception(exc) is Category.TIMEOUT


def test_response_failed_one_timeout_among_reasons() -> None:
    exc = ResponseFailed([Failure(tx_error.ConnectionLost()), Failure(defer.TimeoutError())])
    assert classify_exception(exc) is Category.TIMEOUT


def test_reasons_as_plain_exceptions() -> None:
    exc = ResponseFailed([tx_error.TimeoutError()])
    assert classify_exception(exc) is Category.TIMEOUT


def test_download_failed_error_caused_by_timeout() -> None:
    # Scrapy 2.15+ wraps ResponseFailed in DownloadFailedError with "from".
    inner = ResponseNeverReceived([Failure(tx_error.TimeoutError())])
    try:
        try:
            raise inner
        except ResponseFailed as exc:
            raise DownloadFailedError(str(exc)) from exc
    except DownloadFailedError as outer:
        assert classify_exception(outer) is Category.TIMEOUT


def test_data_loss_wrapped_stays_network() -> None:
    exc = ResponseDataLossError()
    exc.__cause__ = ResponseFailed([Failure(_DataLoss())])
    assert classify_exception(exc) is Category.NETWORK


def test_nested_wrapping_depth() -> None:
    inner = ResponseFailed([Failure(tx_error.TimeoutError())])
    middle = ResponseFailed([Failure(inner)])
    outer = DownloadFailedError()
    outer.__cause__ = middle
    assert classify_exception(outer) is Category.TIMEOUT


def test_wrapping_cycle_terminates() -> None:
    first = DownloadFailedError()
    second = ResponseFailed([Failure(first)])
    first.__cause__ = second
    assert classify_exception(first) is Category.NETWORK


def test_unknown_exception_with_timeout_cause_is_none() -> None:
    exc = ValueError("bad")
    exc.__cause__ = TimeoutError()
    assert classify_exception(exc) is None


# -- Not download failures ----------------------------------------------------------------


class CustomIgnore(IgnoreRequest):
    pass


class IgnoreAndTimeout(IgnoreRequest, TimeoutError):
    pass


@pytest.mark.parametrize(
    "exc",
    [
        IgnoreRequest(),
        CustomIgnore(),
        IgnoreAndTimeout(),
        HttpError(Response("http://127.0.0.1/"), "Ignoring non-200 response"),
    ],
    ids=lambda exc: type(exc).__qualname__,
)
def test_ignore_request_family(exc: BaseException) -> None:
    assert is_ignore_request(exc)
    assert classify_exception(exc) is None
    assert classify_exception(exc, extra_network=(type(exc),)) is None


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(),
        KeyError("x"),
        RuntimeError(),
        TypeError(),
        NotConfigured(),
        NotSupported(),
        UnsupportedURLSchemeError("ftp"),
        CloseSpider(),
        StopDownload(),
        # DOWNLOAD_MAXSIZE exceeded: Scrapy 2.15+ and 2.13/2.14 respectively.
        DownloadCancelledError("Cancelling download of http://a/: size 2 > 1"),
        defer.CancelledError(),
        KeyboardInterrupt(),
        PlaywrightError("net::ERR_ABORTED at http://a/"),
        PlaywrightError("locator.click: element is not visible"),
    ],
    ids=lambda exc: type(exc).__module__ + "." + type(exc).__qualname__,
)
def test_not_download_failures(exc: BaseException) -> None:
    assert not is_ignore_request(exc)
    assert classify_exception(exc) is None


def test_ignore_request_matched_by_name_only() -> None:
    Lookalike = fake_class("scrapy.exceptions", "IgnoreRequest")
    Other = fake_class("mypackage.exceptions", "IgnoreRequest")
    assert is_ignore_request(Lookalike())
    assert not is_ignore_request(Other())


def test_extra_network_classes() -> None:
    class ApiGatewayError(Exception):
        pass

    class ApiGatewayTimeout(ApiGatewayError):
        pass

    assert classify_exception(ApiGatewayError()) is None
    assert classify_exception(ApiGatewayError(), (ApiGatewayError,)) is Category.NETWORK
    assert classify_exception(ApiGatewayTimeout(), (ApiGatewayError,)) is Category.NETWORK


def test_extra_network_wrapping_timeout() -> None:
    class GatewayError(Exception):
        pass

    exc = GatewayError()
    exc.__cause__ = tx_error.TimeoutError()
    assert classify_exception(exc, (GatewayError,)) is Category.TIMEOUT


def test_scrapy_default_retry_exceptions_all_known() -> None:
    """Every class in Scrapy's RETRY_EXCEPTIONS is classified without help."""
    for entry in default_settings.RETRY_EXCEPTIONS:
        cls = load_object(entry) if isinstance(entry, str) else entry
        assert isinstance(cls, type)
        assert issubclass(cls, BaseException)
        try:
            exc = cls()
        except TypeError:
            exc = cls([])
        assert classify_exception(exc) in (Category.NETWORK, Category.TIMEOUT), cls


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Scrapy 2.13 and 2.14 RETRY_EXCEPTIONS entries.
        ("twisted.internet.defer.TimeoutError", Category.TIMEOUT),
        ("twisted.internet.error.TimeoutError", Category.TIMEOUT),
        ("twisted.internet.error.DNSLookupError", Category.NETWORK),
        ("twisted.internet.error.ConnectionRefusedError", Category.NETWORK),
        ("twisted.internet.error.ConnectionDone", Category.NETWORK),
        ("twisted.internet.error.ConnectError", Category.NETWORK),
        ("twisted.internet.error.ConnectionLost", Category.NETWORK),
        ("twisted.internet.error.TCPTimedOutError", Category.TIMEOUT),
        ("twisted.web.client.ResponseFailed", Category.NETWORK),
        ("scrapy.core.downloader.handlers.http11.TunnelError", Category.NETWORK),
    ],
)
def test_scrapy_213_retry_exceptions(name: str, expected: Category) -> None:
    cls = load_object(name)
    exc = cls([]) if issubclass(cls, ResponseFailed) else cls()
    assert classify_exception(exc) is expected


# -- Libraries matched by name ---------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (fake_class("httpx._exceptions", "TimeoutException")(), Category.TIMEOUT),
        (
            fake_class(
                "httpx._exceptions",
                "ReadTimeout",
                fake_class("httpx._exceptions", "TimeoutException"),
            )(),
            Category.TIMEOUT,
        ),
        (fake_class("httpx._exceptions", "NetworkError")(), Category.NETWORK),
        (fake_class("httpx._exceptions", "RemoteProtocolError")(), Category.NETWORK),
        (fake_class("httpx._exceptions", "InvalidURL")(), None),
    ],
    ids=["httpx-timeout", "httpx-read-timeout", "httpx-network", "httpx-protocol", "httpx-url"],
)
def test_httpx_by_name(exc: BaseException, expected: Category | None) -> None:
    assert classify_exception(exc) is expected


def test_aiohttp_real_classes() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    assert classify_exception(aiohttp.ServerDisconnectedError()) is Category.NETWORK
    assert classify_exception(aiohttp.ServerTimeoutError()) is Category.TIMEOUT
    assert classify_exception(aiohttp.ClientPayloadError()) is Category.NETWORK


# -- Playwright ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Page.goto: net::ERR_CONNECTION_REFUSED at http://a/", Category.NETWORK),
        ("Page.goto: net::ERR_CONNECTION_RESET at http://a/", Category.NETWORK),
        ("Page.goto: net::ERR_NAME_NOT_RESOLVED at http://a/", Category.NETWORK),
        ("Page.goto: net::ERR_EMPTY_RESPONSE at http://a/", Category.NETWORK),
        ("Page.goto: net::ERR_CERT_AUTHORITY_INVALID at https://a/", Category.NETWORK),
        ("Page.goto: net::ERR_TIMED_OUT at http://a/", Category.TIMEOUT),
        ("Page.goto: net::ERR_CONNECTION_TIMED_OUT at http://a/", Category.TIMEOUT),
        ("Page.goto: NS_ERROR_CONNECTION_REFUSED", Category.NETWORK),
        ("Page.goto: NS_ERROR_NET_TIMEOUT", Category.TIMEOUT),
        ("Page.goto: net::ERR_ABORTED at http://a/", None),
        ("Page.goto: net::ERR_BLOCKED_BY_CLIENT at http://a/", None),
    ],
)
def test_playwright_navigation_errors(message: str, expected: Category | None) -> None:
    assert classify_exception(PlaywrightError(message)) is expected
    assert classify_exception(OldPlaywrightError(message)) is expected


@pytest.mark.parametrize(
    "exc",
    [
        PlaywrightError("Page.goto: Target crashed"),
        PlaywrightError("Page crashed"),
        PlaywrightError("Target page, context or browser has been closed"),
        PlaywrightTargetClosedError("Target page, context or browser has been closed"),
        PlaywrightTargetClosedError("Browser closed."),
        OldPlaywrightError("Protocol error (Page.navigate): Target closed."),
        # A crash during a navigation that would otherwise be a timeout.
        PlaywrightTimeoutError("Timeout 30000ms exceeded. Target crashed"),
    ],
    ids=lambda exc: f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}",
)
def test_browser_faults(exc: BaseException) -> None:
    assert is_browser_fault(exc)
    assert classify_exception(exc) is None
    assert classify_exception(exc, extra_network=(type(exc),)) is None


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("Target crashed"),
        ConnectionResetError("Target page, context or browser has been closed"),
        PlaywrightError("net::ERR_CONNECTION_RESET"),
        PlaywrightTimeoutError("Timeout 30000ms exceeded."),
    ],
    ids=lambda exc: f"{type(exc).__qualname__}: {exc}",
)
def test_not_browser_faults(exc: BaseException) -> None:
    assert not is_browser_fault(exc)


def test_playwright_error_in_extra_network() -> None:
    exc = PlaywrightError("something unusual")
    assert classify_exception(exc) is None
    assert classify_exception(exc, (PlaywrightError,)) is Category.NETWORK


# -- classify_status ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "has_retry_after", "codes", "expected"),
    [
        (429, False, DEFAULT_RETRY_HTTP_CODES, Category.THROTTLED),
        (429, True, DEFAULT_RETRY_HTTP_CODES, Category.THROTTLED),
        (429, False, (), Category.THROTTLED),
        (503, True, DEFAULT_RETRY_HTTP_CODES, Category.THROTTLED),
        (503, True, (), Category.THROTTLED),
        (503, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (503, False, (), None),
        (500, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (500, True, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (502, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (504, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (522, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (524, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (408, False, DEFAULT_RETRY_HTTP_CODES, Category.SERVER),
        (408, False, (500,), None),
        (403, False, (403, 500), Category.SERVER),
        (200, False, DEFAULT_RETRY_HTTP_CODES, None),
        (200, True, DEFAULT_RETRY_HTTP_CODES, None),
        (301, True, DEFAULT_RETRY_HTTP_CODES, None),
        (404, False, DEFAULT_RETRY_HTTP_CODES, None),
        (501, False, DEFAULT_RETRY_HTTP_CODES, None),
    ],
)
def test_classify_status(
    status: int, has_retry_after: bool, codes: tuple[int, ...], expected: Category | None
) -> None:
    assert classify_status(status, has_retry_after, codes) is expected


def test_classify_status_accepts_any_collection() -> None:
    assert classify_status(500, False, {500, 502}) is Category.SERVER
    assert classify_status(500, False, frozenset()) is None
    assert classify_status(500, False, [500]) is Category.SERVER
