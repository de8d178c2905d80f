"""The response of each profile to a request, decided when the request arrives."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from faultsite.config import HostConfig
from faultsite.content import Page, Redirect, SiteContent
from faultsite.faults import TokenBucket, fault_hits, flaky_fails
from faultsite.protocol import ParsedRequest, http_date

#: The text every ban page contains, so tests and content checks can detect it.
BAN_MARKER = "ACCESS DENIED BY BOT PROTECTION"

_NOT_FOUND_PAGE = b"<!DOCTYPE html>\n<title>Not found</title>\n<p>Not found.</p>\n"


@dataclass
class Response:
    """A response the server sends, and the outcome the log records.

    With ``reset``, the server sends the head and the first half of the body (none
    for HEAD), then resets the connection. ``retry_after`` is in seconds, for the log.
    """

    status: int
    outcome: str
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    retry_after: int | None = None
    reset: bool = False


class HostState:
    """Run-time state of one host: its placement, attempt counts and token bucket."""

    def __init__(self, config: HostConfig, address: str, port: int) -> None:
        self.config = config
        self.address = address
        self.port = port
        self.attempts: dict[str, int] = {}
        self.received = 0
        self.bucket: TokenBucket | None = None
        if config.profile == "rate_limited":
            self.bucket = TokenBucket(config.rate, config.burst, config.penalize_rejected)

    @property
    def refuses_until_listening(self) -> bool:
        """Whether the socket is bound at start but listens only after the failure window."""
        return self.config.profile == "recovering" and self.config.fail_mode == "refuse"

    def failing(self, now: float, started: float) -> bool:
        """Return whether a recovering host is still in its failure window."""
        if self.config.profile != "recovering":
            return False
        if self.config.fail_until_file is not None:
            return not os.path.exists(self.config.fail_until_file)
        return now < started + self.config.fail_seconds

    def next_attempt(self, path: str) -> int:
        """Count a request for the path and return its attempt number, from 1."""
        attempt = self.attempts.get(path, 0) + 1
        self.attempts[path] = attempt
        self.received += 1
        return attempt

    def latency_range(self) -> tuple[float, float]:
        """Return the latency range of the request counted last: the last step of
        ``latency_schedule`` that the requests before it reached, else ``latency``."""
        latency = self.config.latency
        for count, step_latency in self.config.latency_schedule:
            if count >= self.received:
                break
            latency = step_latency
        return latency


def decide(
    host: HostState,
    request: ParsedRequest,
    attempt: int,
    *,
    started: float,
    seed: int,
    content: SiteContent,
) -> Response:
    """Return the response of the host's profile to a request at its arrival time.

    ``started`` is the site's start on the monotonic clock, and the request's
    ``arrival`` is on the same clock.
    """
    config = host.config
    target = request.target
    now = request.arrival

    if config.profile == "flaky" and flaky_fails(seed, config.name, target, attempt, config.rate):
        return _unavailable(config.retry_after)

    in_failure_window = host.failing(now, started)
    if config.profile == "recovering" and config.fail_mode == "503" and in_failure_window:
        return _unavailable(config.retry_after)

    if host.bucket is not None:
        served = host.bucket.take(now)
        response = (
            content_response(host, request, content) if served else _too_many_requests(config)
        )
        if config.ratelimit_headers:
            response.headers.extend(_ratelimit_headers(host.bucket, config, now))
        return response

    if config.profile == "ban" and fault_hits(
        "ban", seed, config.name, target, attempt, rate=config.rate
    ):
        return Response(200, "banned", ban_page(), "text/html; charset=utf-8")

    response = content_response(host, request, content)
    if config.profile == "reset" and fault_hits(
        "reset", seed, config.name, target, attempt, rate=config.rate
    ):
        response.reset = True
        response.outcome = "reset"
    return response


def content_response(host: HostState, request: ParsedRequest, content: SiteContent) -> Response:
    """Return the page, redirect or 404 for the request target, as a healthy host does."""
    if request.method not in ("GET", "HEAD"):
        body = b"Only GET and HEAD are allowed.\n"
        return Response(405, "served", body, headers=[("Allow", "GET, HEAD")])

    for source, location in host.config.redirects:
        if request.target == source:
            body = b"Moved.\n"
            return Response(301, "served", body, headers=[("Location", location)])

    robots_txt = host.config.robots_txt
    if robots_txt is not None and request.target.partition("?")[0] == "/robots.txt":
        return Response(200, "served", robots_txt.encode("utf-8"))

    found = content.lookup(request.target)
    if isinstance(found, Page):
        return Response(200, "served", found.body, found.content_type)
    if isinstance(found, Redirect):
        body = b"Moved to the folder's index page.\n"
        return Response(301, "served", body, headers=[("Location", found.location)])
    return Response(404, "served", _NOT_FOUND_PAGE, "text/html; charset=utf-8")


def ban_page() -> bytes:
    """Return the block page that the ban profile serves with status 200."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>Access denied</title>\n</head>\n<body>\n<h1>Access denied</h1>\n"
        f"<p>{BAN_MARKER}</p>\n<p>Your requests look automated.</p>\n</body>\n</html>\n"
    ).encode()


def _unavailable(retry_after: int | None) -> Response:
    response = Response(503, "rejected", b"Service unavailable, try again later.\n")
    if retry_after is not None:
        response.retry_after = retry_after
        response.headers.append(("Retry-After", str(retry_after)))
    return response


def _too_many_requests(config: HostConfig) -> Response:
    retry_after = config.retry_after if config.retry_after is not None else 1
    if config.retry_after_mode == "http-date":
        # An HTTP date has whole seconds. Round up so a client that obeys it never
        # comes back before retry_after seconds have passed.
        value = http_date(math.ceil(time.time() + retry_after))
    else:
        value = str(retry_after)

    body = f"Too many requests, retry after {retry_after} seconds.\n".encode()
    headers = [("Retry-After", value)]
    return Response(429, "rejected", body, headers=headers, retry_after=retry_after)


def _ratelimit_headers(
    bucket: TokenBucket, config: HostConfig, now: float
) -> list[tuple[str, str]]:
    """Return the IETF draft's separate RateLimit fields for the bucket at ``now``.

    The limit is the burst, the remaining count is the whole tokens left, and the
    reset is the whole seconds (rounded up) until the bucket is full again.
    """
    reset = math.ceil(bucket.seconds_until_full(now))
    return [
        ("RateLimit-Limit", str(config.burst)),
        ("RateLimit-Remaining", str(bucket.remaining(now))),
        ("RateLimit-Reset", str(reset)),
    ]
