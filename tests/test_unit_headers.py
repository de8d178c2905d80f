"""Unit tests for Retry-After and rate-limit header parsing."""

from __future__ import annotations

import ast
import inspect
import logging
import string
from calendar import timegm
from datetime import datetime
from email.utils import formatdate

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scrapy_resilience.core import headers
from scrapy_resilience.core.headers import (
    HeaderGetter,
    RateLimit,
    cap_retry_after,
    parse_rate_limit,
    parse_retry_after,
)

# Thursday 15 January 2026, 12:00:00 UTC.
NOW = float(timegm((2026, 1, 15, 12, 0, 0)))

# Printable ASCII plus characters that trip naive parsers: non-ASCII digits,
# Unicode spaces, a NUL, a lone surrogate and an emoji. An explicit alphabet
# also spares Hypothesis from building its Unicode table on the first run.
FUZZ_ALPHABET = string.printable + "\u0663\uff11\u00a0\u2009\u00e9\x00\ud800\U0001f600"

# Seeded, and without Hypothesis's example database, so runs repeat and leave
# no files behind.
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_getter(fields: dict[str, bytes | str]) -> HeaderGetter:
    """Return a case-insensitive getter over ``fields``, as Scrapy's Headers are."""
    lowered = {name.lower(): value for name, value in fields.items()}
    return lambda name: lowered.get(name.lower())


def test_module_imports_no_scrapy_or_twisted() -> None:
    tree = ast.parse(inspect.getsource(headers))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "scrapy" not in imported
    assert "twisted" not in imported


# -- Retry-After: delay-seconds -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (b"120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("\t30\r\n", 30.0),
        ("007", 7.0),
        ("1.5", 1.5),
        (b"0.25", 0.25),
        ("86400", 86400.0),
        ("99999999999999999999", 1e20),
    ],
)
def test_retry_after_delay_seconds(value: bytes | str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


# -- Retry-After: HTTP-date -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        # IMF-fixdate, the preferred format.
        "Thu, 15 Jan 2026 12:02:00 GMT",
        b"Thu, 15 Jan 2026 12:02:00 GMT",
        # RFC 850, obsolete.
        "Thursday, 15-Jan-26 12:02:00 GMT",
        # asctime, obsolete. A one-digit day is padded with a space.
        "Thu Jan 15 12:02:00 2026",
        # Lenient forms seen in the wild.
        "thu, 15 JAN 2026 12:02:00 gmt",
        "Thu, 15 Jan 2026 12:02:00 UTC",
        "Thu,  15 Jan 2026  12:02:00 GMT",
        "  Thu, 15 Jan 2026 12:02:00 GMT  ",
        # The weekday is not checked against the date.
        "Mon, 15 Jan 2026 12:02:00 GMT",
    ],
)
def test_retry_after_http_date_formats(value: bytes | str) -> None:
    assert parse_retry_after(value, NOW) == 120.0


def test_retry_after_asctime_padded_day() -> None:
    now = float(timegm((1994, 11, 6, 8, 49, 0)))
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", now) == 37.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now) == 37.0
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now) == 37.0


def test_retry_after_date_matches_formatdate() -> None:
    value = formatdate(NOW + 3_600, usegmt=True)
    assert parse_retry_after(value, NOW) == 3_600.0


def test_retry_after_date_keeps_fraction_of_now() -> None:
    assert parse_retry_after("Thu, 15 Jan 2026 12:00:10 GMT", NOW + 0.25) == 9.75


@pytest.mark.parametrize(
    "value",
    [
        "Thu, 15 Jan 2026 11:59:59 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Sun Nov  6 08:49:37 1994",
        "Thu, 15 Jan 2026 12:00:00 GMT",
    ],
)
def test_retry_after_past_date_is_zero(value: str) -> None:
    assert parse_retry_after(value, NOW) == 0.0


def test_retry_after_leap_second_accepted() -> None:
    assert parse_retry_after("Wed, 31 Dec 2025 23:59:60 GMT", NOW) == 0.0
    assert parse_retry_after("Thu, 15 Jan 2026 12:00:60 GMT", NOW) == 59.0


@pytest.mark.parametrize(
    ("two_digit_year", "expected_year"),
    [("26", 2026), ("76", 2076), ("77", 1977), ("99", 1999), ("00", 2000)],
)
def test_retry_after_rfc850_two_digit_year(two_digit_year: str, expected_year: int) -> None:
    """A two-digit year more than 50 years ahead belongs to the past century."""
    value = f"Friday, 15-Jan-{two_digit_year} 12:00:00 GMT"
    expected = max(0.0, timegm((expected_year, 1, 15, 12, 0, 0)) - NOW)
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_far_future_date() -> None:
    seconds = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW)
    assert seconds == timegm((9999, 12, 31, 23, 59, 59)) - NOW


# -- Retry-After: rejected values -------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        b"",
        "   ",
        "-1",
        "-0.5",
        "+5",
        "1e3",
        "nan",
        "NaN",
        "inf",
        "Infinity",
        "1_000",
        "0x10",
        "1.",
        ".5",
        "1.5.2",
        "12 34",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: int() accepts it, HTTP does not
        "\uff11\uff10",  # FULLWIDTH DIGITS 1 0
        "soon",
        "120 seconds",
        b"\xff\xfe\x00",
        b"12\xff",
        "9" * 300,
        "1" + " " * 10_000,
        "x" * 1_000_000,
        # Dates that do not exist or cannot be represented.
        "Mon, 31 Feb 2026 12:00:00 GMT",
        "Thu, 15 Jan 0000 12:00:00 GMT",
        "Thu, 15 Jan 2026 24:00:00 GMT",
        "Thu, 15 Jan 2026 12:61:00 GMT",
        "Thu, 15 Foo 2026 12:00:00 GMT",
        "Thu, 15 Jan 26 12:00:00 GMT",
        "Thu, 15 Jan 20266 12:00:00 GMT",
        "Thu, 15 Jan 2026 12:00:00 +0100",
        "Thu, 15 Jan 2026 12:00:00",
        "2026-01-15T12:02:00Z",
        "Thursday, 15-Jan-2026 12:00:00 GMT",
        "Thu Jan 15 12:02:00 2026 GMT",
    ],
)
def test_retry_after_invalid_returns_none(value: bytes | str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_retry_after_other_types_return_none() -> None:
    assert parse_retry_after([b"5"], NOW) is None  # type: ignore[arg-type]
    assert parse_retry_after(5, NOW) is None  # type: ignore[arg-type]


def test_retry_after_rfc850_with_unusable_now() -> None:
    value = "Thursday, 15-Jan-26 12:02:00 GMT"
    assert parse_retry_after(value, float("nan")) is None
    assert parse_retry_after(value, 1e30) is None


def test_retry_after_invalid_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="scrapy_resilience.core.headers")
    assert parse_retry_after("soon", NOW) is None

    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.DEBUG
    assert record.name == "scrapy_resilience.core.headers"
    assert "Retry-After" in record.getMessage()
    assert "'soon'" in record.getMessage()
    # %-style arguments, not a pre-formatted message.
    assert record.args


def test_retry_after_long_value_truncated_in_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="scrapy_resilience.core.headers")
    assert parse_retry_after("y" * 50_000, NOW) is None
    assert len(caplog.records) == 1
    assert len(caplog.records[0].getMessage()) < 200


def test_retry_after_absent_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="scrapy_resilience.core.headers")
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("5", NOW) == 5.0
    assert caplog.records == []


@FUZZ
@given(st.one_of(st.text(FUZZ_ALPHABET, max_size=64), st.binary(max_size=64)))
def test_retry_after_fuzz_never_raises(value: bytes | str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or seconds >= 0.0


@FUZZ
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)))
def test_retry_after_fuzz_dates_round_trip(moment: datetime) -> None:
    moment = moment.replace(microsecond=0)
    epoch = timegm(moment.utctimetuple())
    imf = moment.strftime("%a, %d %b %Y %H:%M:%S GMT")
    asctime = moment.strftime("%a %b %e %H:%M:%S %Y")
    expected = max(0.0, epoch - NOW)
    assert parse_retry_after(imf, NOW) == expected
    assert parse_retry_after(asctime, NOW) == expected


# -- cap_retry_after --------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "maximum", "expected"),
    [
        (10.0, 5.0, (5.0, True)),
        (3.0, 5.0, (3.0, False)),
        (5.0, 5.0, (5.0, False)),
        (0.0, 5.0, (0.0, False)),
        (1e20, 600.0, (600.0, True)),
    ],
)
def test_cap_retry_after(seconds: float, maximum: float, expected: tuple[float, bool]) -> None:
    assert cap_retry_after(seconds, maximum) == expected


# -- RateLimit: presence ----------------------------------------------------------


def test_rate_limit_absent() -> None:
    assert parse_rate_limit(make_getter({}), NOW) is None
    assert parse_rate_limit(make_getter({"Content-Type": "text/html"}), NOW) is None


def test_rate_limit_is_frozen() -> None:
    result = RateLimit(limit=1, remaining=0, reset=1.0)
    with pytest.raises(AttributeError):
        result.limit = 5  # type: ignore[misc]


# -- RateLimit: IETF separate fields ------------------------------------------------


def test_ietf_separate_fields() -> None:
    get = make_getter(
        {"RateLimit-Limit": "100", "RateLimit-Remaining": "0", "RateLimit-Reset": "50"}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=0, reset=50.0)


def test_ietf_separate_fields_lowercase_bytes() -> None:
    get = make_getter(
        {"ratelimit-limit": b"10", "ratelimit-remaining": b"1", "ratelimit-reset": b"7"}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=10, remaining=1, reset=7.0)


def test_ietf_limit_with_quota_policies() -> None:
    get = make_getter(
        {
            "RateLimit-Limit": "10, 10;w=1, 50;w=60, 1000;w=3600",
            "RateLimit-Remaining": "4",
            "RateLimit-Reset": "1",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=10, remaining=4, reset=1.0)


def test_ietf_separate_fields_partial() -> None:
    get = make_getter({"RateLimit-Remaining": "3"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=3, reset=None)


# -- RateLimit: IETF combined field, older dictionary form ------------------------------


def test_ietf_dictionary_form() -> None:
    get = make_getter({"RateLimit": "limit=10, remaining=5, reset=3"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=10, remaining=5, reset=3.0)


def test_ietf_dictionary_form_parameters_ignored() -> None:
    get = make_getter(
        {
            "RateLimit": "limit=100;w=60, remaining=50, reset=5;comment=x",
            "RateLimit-Policy": "100;w=60",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=50, reset=5.0)


def test_ietf_dictionary_form_duplicates_most_restrictive() -> None:
    # Two field lines merged into one value by a proxy.
    get = make_getter(
        {"RateLimit": "limit=10, remaining=5, reset=3, limit=100, remaining=1, reset=60"}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=1, reset=60.0)


def test_ietf_dictionary_form_garbage_field() -> None:
    get = make_getter({"RateLimit": "limit=ten, remaining=5, reset=-3"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=5, reset=None)


# -- RateLimit: IETF combined field, newer structured form -------------------------------


def test_ietf_structured_form_with_policy() -> None:
    get = make_getter(
        {"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=50, reset=30.0)


def test_ietf_structured_form_without_policy() -> None:
    get = make_getter({"RateLimit": '"default";r=0;t=50'})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=0, reset=50.0)


def test_ietf_structured_form_lowest_remaining_wins() -> None:
    get = make_getter(
        {
            "RateLimit": '"burst";r=40;t=1, "day";r=3;t=36000',
            "RateLimit-Policy": '"burst";q=50;w=1, "day";q=5000;w=86400',
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=5000, remaining=3, reset=36000.0)


def test_ietf_structured_form_tie_takes_later_reset() -> None:
    get = make_getter({"RateLimit": '"a";r=0;t=5, "b";r=0;t=90, "c";r=0;t=10'})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=0, reset=90.0)


def test_ietf_structured_form_token_names_and_extra_parameters() -> None:
    get = make_getter(
        {
            "RateLimit": "peruser;r=9;t=50;pk=:dHJpYWw=:",
            "RateLimit-Policy": 'peruser;q=10;qu="requests";w=60;pk=:dHJpYWw=:',
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=10, remaining=9, reset=50.0)


def test_ietf_structured_form_quoted_name_with_separators() -> None:
    get = make_getter(
        {
            "RateLimit": '"a,b;c=d";r=2;t=4',
            "RateLimit-Policy": '"x";q=1;w=1, "a,b;c=d";q=20;w=60',
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=20, remaining=2, reset=4.0)


def test_ietf_structured_form_single_policy_other_name() -> None:
    # Cloudflare's API documentation gives these two examples, whose item
    # names differ. The only policy is taken as the limit.
    get = make_getter(
        {"Ratelimit": '"default";r=50;t=30', "Ratelimit-Policy": '"burst";q=100;w=60'}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=50, reset=30.0)


def test_ietf_structured_form_unmatched_among_several_policies() -> None:
    get = make_getter(
        {
            "RateLimit": '"other";r=5;t=3',
            "RateLimit-Policy": '"a";q=10;w=1, "b";q=20;w=60',
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=5, reset=3.0)


def test_ietf_structured_form_draft07_policy() -> None:
    get = make_getter({"RateLimit": '"x";r=1;t=2', "RateLimit-Policy": "100;w=10"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=1, reset=2.0)


def test_ietf_structured_form_missing_remaining() -> None:
    get = make_getter({"RateLimit": '"default";t=30, "other";t=5'})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=None, reset=30.0)


def test_ietf_structured_form_garbage_falls_through() -> None:
    get = make_getter({"RateLimit": '"default";r=x;t=y', "X-RateLimit-Remaining": "7"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=7, reset=None)


def test_combined_field_wins_over_x_headers() -> None:
    get = make_getter(
        {
            "RateLimit": '"default";r=1;t=9',
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "4999",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=1, reset=9.0)


# -- RateLimit: de-facto X- headers ----------------------------------------------------


def test_github_style_epoch_seconds() -> None:
    get = make_getter(
        {
            "x-ratelimit-limit": "60",
            "x-ratelimit-remaining": "56",
            "x-ratelimit-used": "4",
            "x-ratelimit-reset": str(int(NOW) + 600),
            "x-ratelimit-resource": "core",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=60, remaining=56, reset=600.0)


def test_github_used_gives_missing_remaining() -> None:
    get = make_getter({"X-RateLimit-Limit": "60", "X-RateLimit-Used": "61"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=60, remaining=0, reset=None)


def test_twitter_style_headers() -> None:
    get = make_getter(
        {
            "x-rate-limit-limit": "900",
            "x-rate-limit-remaining": "0",
            "x-rate-limit-reset": str(int(NOW) + 45),
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=900, remaining=0, reset=45.0)


def test_reset_epoch_milliseconds() -> None:
    get = make_getter({"X-RateLimit-Reset": str(int(NOW * 1000) + 30_000)})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=None, reset=30.0)


def test_reset_epoch_in_past_is_zero() -> None:
    get = make_getter({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1600000000"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=0, reset=0.0)


def test_reset_delta_below_epoch_threshold() -> None:
    get = make_getter({"X-RateLimit-Reset": "999999999"})
    result = parse_rate_limit(get, NOW)
    assert result == RateLimit(limit=None, remaining=None, reset=999_999_999.0)


def test_reddit_style_decimals() -> None:
    get = make_getter(
        {"x-ratelimit-used": "2", "x-ratelimit-remaining": "598.0", "x-ratelimit-reset": "240"}
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=598, reset=240.0)


def test_discord_reset_after_wins() -> None:
    get = make_getter(
        {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{NOW + 100:.3f}",
            "X-RateLimit-Reset-After": "1.5",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=5, remaining=0, reset=1.5)


def test_discord_epoch_with_fraction() -> None:
    get = make_getter({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": f"{NOW + 2.5}"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=1, reset=2.5)


def test_x_multiple_values_paired_by_position() -> None:
    get = make_getter(
        {
            "X-RateLimit-Limit": "100, 1000",
            "X-RateLimit-Remaining": "10, 0",
            "X-RateLimit-Reset": "5, 60",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=1000, remaining=0, reset=60.0)


def test_x_multiple_values_unpaired_most_restrictive() -> None:
    get = make_getter(
        {
            "X-RateLimit-Limit": "100, 1000, 50",
            "X-RateLimit-Remaining": "10, 3",
            "X-RateLimit-Reset": "5",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=50, remaining=3, reset=5.0)


def test_x_partial_garbage_values_skipped() -> None:
    get = make_getter({"X-RateLimit-Remaining": "abc, 4, -1"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=None, remaining=4, reset=None)


def test_garbage_field_is_none_others_kept() -> None:
    get = make_getter(
        {
            "X-RateLimit-Limit": "100",
            "X-RateLimit-Remaining": "lots",
            "X-RateLimit-Reset": "-5",
        }
    )
    assert parse_rate_limit(get, NOW) == RateLimit(limit=100, remaining=None, reset=None)


@pytest.mark.parametrize(
    "value",
    ["abc", "-1", "1e3", "nan", "inf", "", "  ", b"\xff\xfe", "\u0663", "9" * 5_000],
)
def test_all_garbage_returns_none(value: bytes | str) -> None:
    get = make_getter(
        {
            "RateLimit": value,
            "RateLimit-Remaining": value,
            "X-RateLimit-Limit": value,
            "X-RateLimit-Remaining": value,
            "X-RateLimit-Reset": value,
            "X-Rate-Limit-Remaining": value,
            "X-Shopify-Shop-Api-Call-Limit": value,
        }
    )
    assert parse_rate_limit(get, NOW) is None


def test_large_count_stays_exact() -> None:
    get = make_getter({"X-RateLimit-Remaining": "12345678901234567890"})
    result = parse_rate_limit(get, NOW)
    assert result is not None
    assert result.remaining == 12345678901234567890


# -- RateLimit: Shopify ------------------------------------------------------------------


def test_shopify_call_limit() -> None:
    get = make_getter({"X-Shopify-Shop-Api-Call-Limit": "32/40"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=40, remaining=8, reset=None)


def test_shopify_call_limit_over_bucket() -> None:
    get = make_getter({"X-Shopify-Shop-Api-Call-Limit": "41/40"})
    assert parse_rate_limit(get, NOW) == RateLimit(limit=40, remaining=0, reset=None)


# -- RateLimit: fuzzing -------------------------------------------------------------------

_FIELD_NAMES = [
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-RateLimit-Reset-After",
    "X-RateLimit-Used",
    "X-Rate-Limit-Remaining",
    "X-Shopify-Shop-Api-Call-Limit",
]
_FIELD_VALUES = st.one_of(
    st.text(FUZZ_ALPHABET, max_size=40),
    st.binary(max_size=40),
    st.text(alphabet='0123456789.,;="rtqwlimtsa -', max_size=40),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(_FIELD_NAMES), _FIELD_VALUES, max_size=6))
def test_rate_limit_fuzz_never_raises(fields: dict[str, bytes | str]) -> None:
    result = parse_rate_limit(make_getter(fields), NOW)
    if result is None:
        return
    assert result.limit is None or result.limit >= 0
    assert result.remaining is None or result.remaining >= 0
    assert result.reset is None or result.reset >= 0.0
    assert (result.limit, result.remaining, result.reset) != (None, None, None)
