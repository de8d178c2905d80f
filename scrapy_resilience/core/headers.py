"""Parse ``Retry-After`` and rate-limit response headers.

Pure logic: headers are read through a :data:`HeaderGetter` and the wall
clock is an argument (epoch seconds), so no Scrapy type is needed. Every
parser returns None for a value it cannot use and never raises on header
content.
"""

from __future__ import annotations

import logging
import math
import re
from calendar import timegm
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

#: Function returning the first value of a response header by case-insensitive
#: name, or None when the header is absent.
HeaderGetter = Callable[[str], "bytes | str | None"]

# Values longer than these are rejected without parsing. The longest HTTP-date
# (RFC 850 with "Wednesday") has 33 characters, and rate-limit policies with
# partition keys can have a few hundred.
_MAX_RETRY_AFTER_LENGTH = 256
_MAX_RATE_LIMIT_LENGTH = 4096
_MAX_LIST_MEMBERS = 64

# Header values in log messages are cut to this many characters.
_LOG_VALUE_LENGTH = 100

# A reset above these values is an epoch timestamp rather than a delay,
# because no window lasts 1e9 seconds (31.7 years). 1e12 is the same bound in
# milliseconds.
_EPOCH_SECONDS_THRESHOLD = 1e9
_EPOCH_MILLISECONDS_THRESHOLD = 1e12

# Non-negative decimal number in ASCII digits. Python's int() and float()
# would also accept "1_000", "1e3", "inf", "nan", signs and non-ASCII digits.
_NUMBER_RE = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,9})?", re.ASCII)


# -- Retry-After ------------------------------------------------------------

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun",
           "jul", "aug", "sep", "oct", "nov", "dec")  # fmt: skip
_MONTH_RE = "(?P<month>" + "|".join(_MONTHS) + ")"
_SHORT_DAY_RE = "(?:mon|tue|wed|thu|fri|sat|sun)"
_LONG_DAY_RE = "(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_TIME_RE = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
_FLAGS = re.ASCII | re.IGNORECASE

# The three HTTP-date formats of RFC 9110, section 5.6.7. Names are matched
# case-insensitively, runs of spaces are accepted, and "UTC" may replace "GMT".
# The weekday is not checked against the date.
_IMF_FIXDATE_RE = re.compile(
    rf"{_SHORT_DAY_RE}, +(?P<day>[0-9]{{1,2}}) +{_MONTH_RE} +(?P<year>[0-9]{{4}})"
    rf" +{_TIME_RE} +(?:GMT|UTC)",
    _FLAGS,
)
_RFC850_DATE_RE = re.compile(
    rf"{_LONG_DAY_RE}, +(?P<day>[0-9]{{1,2}})-{_MONTH_RE}-(?P<year>[0-9]{{2}})"
    rf" +{_TIME_RE} +(?:GMT|UTC)",
    _FLAGS,
)
_ASCTIME_DATE_RE = re.compile(
    rf"{_SHORT_DAY_RE} +{_MONTH_RE} +(?P<day>[0-9]{{1,2}}) +{_TIME_RE}"
    rf" +(?P<year>[0-9]{{4}})",
    _FLAGS,
)


def parse_retry_after(value: bytes | str | None, now: float) -> float | None:
    """Return the seconds to wait (>= 0) from a ``Retry-After`` value, or None.

    Accepted forms are delay-seconds (a non-negative integer, and leniently a
    decimal such as ``"1.5"``) and an HTTP-date in any RFC 9110 format
    (IMF-fixdate, RFC 850 or asctime). ``now`` is the wall clock in epoch
    seconds. A date in the past gives 0.0. None is returned for an absent,
    empty, negative, non-numeric, non-UTF-8, overlong or out-of-range value,
    and every value that is present but rejected is logged at DEBUG.
    """
    if value is None:
        return None

    text = _decode(value, _MAX_RETRY_AFTER_LENGTH)
    seconds = None
    if text is not None:
        seconds = _parse_delay_seconds(text)
        if seconds is None:
            seconds = _parse_http_date_delay(text, now)

    if seconds is None:
        logger.debug("Ignoring invalid Retry-After value %r", _preview(value))
    return seconds


def cap_retry_after(seconds: float, maximum: float) -> tuple[float, bool]:
    """Cap a ``Retry-After`` delay at ``maximum`` seconds.

    Return the capped delay and whether the cap applied, so that the caller
    can log the first cap for each domain.
    """
    return min(seconds, maximum), seconds > maximum


def _preview(value: object) -> object:
    """Return the start of a header value for a log message."""
    if isinstance(value, (bytes, str)):
        return value[:_LOG_VALUE_LENGTH]
    return value


def _decode(value: bytes | str, max_length: int) -> str | None:
    # Callers that pass another type, such as Scrapy's getlist() result, get
    # None rather than an exception.
    if not isinstance(value, (bytes, str)) or len(value) > max_length:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value.strip()


def _parse_number(text: str) -> float | None:
    if not _NUMBER_RE.fullmatch(text):
        return None
    return float(text)


def _parse_delay_seconds(text: str) -> float | None:
    seconds = _parse_number(text)
    if seconds is None or not math.isfinite(seconds):
        return None
    return seconds


def _parse_http_date_delay(text: str, now: float) -> float | None:
    epoch = _parse_http_date(text, now)
    if epoch is None:
        return None

    seconds = epoch - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _parse_http_date(text: str, now: float) -> float | None:
    """Return the epoch seconds of an HTTP-date, or None."""
    match = _IMF_FIXDATE_RE.fullmatch(text) or _ASCTIME_DATE_RE.fullmatch(text)
    two_digit_year = False
    if match is None:
        match = _RFC850_DATE_RE.fullmatch(text)
        two_digit_year = True
    if match is None:
        return None

    year: int | None = int(match["year"])
    if two_digit_year:
        year = _expand_two_digit_year(int(match["year"]), now)
    if year is None:
        return None

    # HTTP-date allows a leap second (60), which datetime rejects. Reading it
    # as 59 makes the delay one second short, which is harmless.
    second = min(int(match["second"]), 59)
    month = _MONTHS.index(match["month"].lower()) + 1
    try:
        moment = datetime(
            year, month, int(match["day"]), int(match["hour"]),
            int(match["minute"]), second, tzinfo=timezone.utc,
        )  # fmt: skip
    except ValueError:
        return None
    return float(timegm(moment.utctimetuple()))


def _expand_two_digit_year(year: int, now: float) -> int | None:
    """Expand an RFC 850 two-digit year as RFC 9110 requires.

    A year that would be more than 50 years in the future belongs to the
    previous century.
    """
    try:
        current_year = datetime.fromtimestamp(now, tz=timezone.utc).year
    except (OverflowError, OSError, ValueError):
        return None

    expanded = current_year // 100 * 100 + year
    if expanded > current_year + 50:
        expanded -= 100
    return expanded


# -- Rate-limit headers -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Rate-limit state that a response advertises.

    ``limit`` is the quota of the window, ``remaining`` the quota left in it,
    and ``reset`` the seconds from now until the window resets (>= 0). Each
    field is None when the response does not give it or gives garbage.
    """

    limit: int | None
    remaining: int | None
    reset: float | None


def parse_rate_limit(get: HeaderGetter, now: float) -> RateLimit | None:
    """Read the rate-limit headers of a response, or return None.

    ``now`` is the wall clock in epoch seconds. The first of these header
    families that yields a usable field is returned:

    1. The IETF draft's combined ``RateLimit`` field, in its newer structured
       form (``"default";r=5;t=3``: ``r`` remaining, ``t`` seconds to reset)
       or its older dictionary form (``limit=10, remaining=5, reset=3``).
       For the newer form the limit is the ``q`` of the ``RateLimit-Policy``
       item with the same name, or of the only item. Cloudflare sends this.
    2. The IETF draft's separate ``RateLimit-Limit``, ``RateLimit-Remaining``
       and ``RateLimit-Reset`` fields. A ``RateLimit-Limit`` followed by
       policies (``10, 10;w=1``) gives its first value.
    3. ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (GitHub, Reddit,
       Discord and many gateways). When Remaining is missing,
       ``X-RateLimit-Used`` subtracted from the limit gives it. A delay in
       ``X-RateLimit-Reset-After`` (Discord) takes precedence over Reset.
    4. ``X-Rate-Limit-Limit``, ``-Remaining`` and ``-Reset`` (Twitter/X).
    5. ``X-Shopify-Shop-Api-Call-Limit`` (``used/limit``), which gives no
       reset.

    A reset is read as a delay in seconds, except that a value above 1e9 is
    an epoch timestamp in seconds and one above 1e12 in milliseconds (GitHub
    and Twitter send epoch seconds). A reset in the past gives 0.0. Decimal
    counts such as ``"598.0"`` are rounded down.

    When a field lists several values, the most restrictive one wins: the
    lowest remaining, with the limit and reset at the same position when the
    fields have as many values, else the lowest limit and the latest reset.
    Garbage in a field makes that field None.
    """
    parsers = (
        _parse_combined_family,
        _parse_separate_family,
        _parse_x_ratelimit_family,
        _parse_x_rate_limit_family,
        _parse_shopify_family,
    )
    for parse in parsers:
        result = parse(get, now)
        if result is not None:
            return result
    return None


def _read_field(get: HeaderGetter, name: str) -> str | None:
    """Return a header's decoded, stripped value, or None if absent or unusable."""
    value = get(name)
    if value is None:
        return None

    text = _decode(value, _MAX_RATE_LIMIT_LENGTH)
    if not text:
        logger.debug("Ignoring invalid %s header %r", name, _preview(value))
        return None
    return text


def _usable(limit: int | None, remaining: int | None, reset: float | None) -> RateLimit | None:
    if limit is None and remaining is None and reset is None:
        return None
    return RateLimit(limit=limit, remaining=remaining, reset=reset)


# Structured-field lists: members are separated by commas and parameters by
# semicolons, except inside quoted strings.


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    in_quotes = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == separator and not in_quotes:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def _split_members(text: str) -> list[str]:
    members = [part for part in _split_outside_quotes(text, ",") if part]
    return members[:_MAX_LIST_MEMBERS]


def _split_parameters(member: str) -> tuple[str, dict[str, str]]:
    """Split ``item;key=value;...`` into the bare item and its parameters."""
    bare, *raw_parameters = _split_outside_quotes(member, ";")
    parameters: dict[str, str] = {}
    for raw in raw_parameters:
        key, _, value = raw.partition("=")
        parameters[key.strip().lower()] = value.strip()
    return bare, parameters


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _parse_count(text: str | None) -> int | None:
    """Parse a non-negative count, rounding a decimal down."""
    if text is None or not _NUMBER_RE.fullmatch(text):
        return None
    # Cutting the fraction off the text keeps large counts exact.
    return int(text.partition(".")[0])


def _parse_reset(text: str | None, now: float) -> float | None:
    if text is None:
        return None
    number = _parse_number(text)
    if number is None:
        return None
    return _reset_seconds(number, now)


def _reset_seconds(value: float, now: float) -> float | None:
    """Turn a reset value into seconds from now, reading large ones as epochs."""
    if value > _EPOCH_MILLISECONDS_THRESHOLD:
        value = value / 1000 - now
    elif value > _EPOCH_SECONDS_THRESHOLD:
        value = value - now
    if not math.isfinite(value):
        return None
    return max(0.0, value)


def _most_restrictive(
    limits: Sequence[int | None],
    remainings: Sequence[int | None],
    resets: Sequence[float | None],
) -> RateLimit | None:
    """Combine parallel value lists into one RateLimit, most restrictive first.

    The lowest remaining wins. The limit and reset come from its position
    when their list has the same length. Otherwise the lowest limit and the
    latest reset are taken.
    """
    best = _most_restrictive_index(remainings, resets)
    if best is None:
        return _usable(_min_or_none(limits), None, _max_or_none(resets))

    limit = limits[best] if len(limits) == len(remainings) else _min_or_none(limits)
    reset = resets[best] if len(resets) == len(remainings) else _max_or_none(resets)
    return _usable(limit, remainings[best], reset)


def _most_restrictive_index(
    remainings: Sequence[int | None], resets: Sequence[float | None]
) -> int | None:
    """Return the position of the lowest remaining, or None if there is none.

    A tie goes to the later reset when the resets are given per position.
    """
    candidates = [i for i, remaining in enumerate(remainings) if remaining is not None]
    if not candidates:
        return None

    paired = len(resets) == len(remainings)

    def restrictiveness(index: int) -> tuple[int, float]:
        remaining = remainings[index]
        reset = resets[index] if paired else None
        return (0 if remaining is None else remaining, -(reset or 0.0))

    return min(candidates, key=restrictiveness)


def _min_or_none(values: Sequence[int | None]) -> int | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def _max_or_none(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


# -- 1. The IETF draft's combined RateLimit field ----------------------------


def _parse_combined_family(get: HeaderGetter, now: float) -> RateLimit | None:
    text = _read_field(get, "RateLimit")
    if text is None:
        return None

    members = [_split_parameters(member) for member in _split_members(text)]
    if any(_is_dictionary_member(bare) for bare, _ in members):
        return _parse_dictionary_form(members, now)
    return _parse_structured_form(members, get, now)


def _is_dictionary_member(bare: str) -> bool:
    # A quoted policy name may contain "=", a dictionary key cannot.
    return "=" in bare and not bare.startswith('"')


def _parse_dictionary_form(
    members: list[tuple[str, dict[str, str]]], now: float
) -> RateLimit | None:
    """Read the draft 07 form ``limit=10, remaining=5, reset=3``, ignoring parameters."""
    limits: list[int | None] = []
    remainings: list[int | None] = []
    resets: list[float | None] = []
    for bare, _ in members:
        key, _, value = bare.partition("=")
        key = key.strip().lower()
        if key == "limit":
            limits.append(_parse_count(value.strip()))
        elif key == "remaining":
            remainings.append(_parse_count(value.strip()))
        elif key == "reset":
            resets.append(_parse_reset(value.strip(), now))
    return _most_restrictive(limits, remainings, resets)


def _parse_structured_form(
    members: list[tuple[str, dict[str, str]]], get: HeaderGetter, now: float
) -> RateLimit | None:
    """Read ``"name";r=5;t=3`` items and take the limit from RateLimit-Policy."""
    remainings = [_parse_count(parameters.get("r")) for _, parameters in members]
    resets = [_parse_reset(parameters.get("t"), now) for _, parameters in members]

    best = _most_restrictive_index(remainings, resets)
    if best is None:
        # No usable "r": report the latest reset alone, if any.
        return _usable(None, None, _max_or_none(resets))

    name = _unquote(members[best][0])
    limit = _policy_quota(get, name)
    return RateLimit(limit=limit, remaining=remainings[best], reset=resets[best])


def _policy_quota(get: HeaderGetter, name: str | None) -> int | None:
    """Return the quota of the named RateLimit-Policy item, or of the only one.

    Drafts from 08 write ``"name";q=100;w=60``, and draft 07 wrote ``100;w=60``.
    """
    text = _read_field(get, "RateLimit-Policy")
    if text is None:
        return None

    # (name, quota) pairs. Draft 07 policies have no name.
    policies: list[tuple[str | None, int | None]] = []
    for member in _split_members(text):
        bare, parameters = _split_parameters(member)
        if "q" in parameters:
            policies.append((_unquote(bare), _parse_count(parameters["q"])))
        else:
            policies.append((None, _parse_count(bare)))

    for policy_name, quota in policies:
        if name is not None and policy_name == name:
            return quota
    if len(policies) == 1:
        return policies[0][1]
    return None


# -- 2. to 4. Separate Limit, Remaining and Reset fields -----------------------


def _parse_separate_fields(
    get: HeaderGetter, prefix: str, now: float
) -> tuple[list[int | None], list[int | None], list[float | None]]:
    limits = _parse_limit_field(_read_field(get, prefix + "Limit"))
    remaining_values = _bare_values(_read_field(get, prefix + "Remaining"))
    reset_values = _bare_values(_read_field(get, prefix + "Reset"))

    remainings = [_parse_count(value) for value in remaining_values]
    resets = [_parse_reset(value, now) for value in reset_values]
    return limits, remainings, resets


def _parse_limit_field(text: str | None) -> list[int | None]:
    """Read a Limit field, whose first value alone counts when policies follow.

    Drafts before 07 allowed ``RateLimit-Limit: 10, 10;w=1, 50;w=60``.
    """
    if text is None:
        return []

    members = [_split_parameters(member) for member in _split_members(text)]
    if any(parameters for _, parameters in members):
        return [_parse_count(members[0][0])]
    return [_parse_count(bare) for bare, _ in members]


def _bare_values(text: str | None) -> list[str]:
    """Return the members of a list field without their parameters."""
    if text is None:
        return []
    return [_split_parameters(member)[0] for member in _split_members(text)]


def _parse_separate_family(get: HeaderGetter, now: float) -> RateLimit | None:
    return _most_restrictive(*_parse_separate_fields(get, "RateLimit-", now))


def _parse_x_ratelimit_family(get: HeaderGetter, now: float) -> RateLimit | None:
    limits, remainings, resets = _parse_separate_fields(get, "X-RateLimit-", now)

    reset_after = _parse_delay_field(get, "X-RateLimit-Reset-After")
    if reset_after is not None:
        resets = [reset_after]

    result = _most_restrictive(limits, remainings, resets)
    if result is not None and result.remaining is None and result.limit is not None:
        used = _parse_count(_read_field(get, "X-RateLimit-Used"))
        if used is not None:
            remaining = max(0, result.limit - used)
            result = RateLimit(result.limit, remaining, result.reset)
    return result


def _parse_delay_field(get: HeaderGetter, name: str) -> float | None:
    text = _read_field(get, name)
    if text is None:
        return None
    return _parse_delay_seconds(text)


def _parse_x_rate_limit_family(get: HeaderGetter, now: float) -> RateLimit | None:
    return _most_restrictive(*_parse_separate_fields(get, "X-Rate-Limit-", now))


# -- 5. Shopify ---------------------------------------------------------------

_SHOPIFY_CALL_LIMIT_RE = re.compile(r"([0-9]{1,9}) */ *([0-9]{1,9})", re.ASCII)


def _parse_shopify_family(get: HeaderGetter, now: float) -> RateLimit | None:
    text = _read_field(get, "X-Shopify-Shop-Api-Call-Limit")
    if text is None:
        return None

    match = _SHOPIFY_CALL_LIMIT_RE.fullmatch(text)
    if match is None:
        return None
    used, limit = int(match[1]), int(match[2])
    return RateLimit(limit=limit, remaining=max(0, limit - used), reset=None)
