"""Unit tests for the backoff policy: ceilings, jitter ranges and validation."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import random
import statistics

import pytest

from scrapy_resilience.core import backoff
from scrapy_resilience.core.backoff import JITTER_MODES, Backoff

DRAWS = 20_000


def draw_many(policy: Backoff, failures: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [policy.delay(failures, rng) for _ in range(DRAWS)]


def test_module_imports_no_scrapy_or_twisted() -> None:
    tree = ast.parse(inspect.getsource(backoff))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "scrapy" not in imported
    assert "twisted" not in imported


def test_defaults() -> None:
    policy = Backoff()
    assert policy.base == 1.0
    assert policy.factor == 2.0
    assert policy.maximum == 60.0
    assert policy.jitter == "equal"
    assert JITTER_MODES == ("equal", "full", "decorrelated", "none")


def test_policy_is_frozen() -> None:
    policy = Backoff()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.base = 5.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (8, 60.0)],
)
def test_ceiling_doubles_up_to_maximum(failures: int, expected: float) -> None:
    assert Backoff().ceiling(failures) == expected


def test_ceiling_fractional_factor() -> None:
    policy = Backoff(base=0.5, factor=1.5, maximum=100.0)
    assert policy.ceiling(1) == 0.5
    assert policy.ceiling(3) == pytest.approx(0.5 * 1.5**2)


@pytest.mark.parametrize("failures", [60, 1_024, 1_075, 10_000, 10**6, 10**400])
def test_ceiling_huge_failure_count(failures: int) -> None:
    assert Backoff().ceiling(failures) == 60.0
    assert Backoff(factor=1.0000001, maximum=3600.0).ceiling(failures) <= 3600.0


def test_ceiling_extreme_bounds() -> None:
    policy = Backoff(base=1e-300, factor=10.0, maximum=1e300)
    assert policy.ceiling(1) == 1e-300
    assert policy.ceiling(301) == pytest.approx(1.0)
    assert policy.ceiling(10**400) == 1e300


def test_ceiling_factor_one_stays_at_base() -> None:
    policy = Backoff(base=3.0, factor=1.0, maximum=10.0)
    assert policy.ceiling(1) == 3.0
    assert policy.ceiling(10_000) == 3.0


def test_ceiling_maximum_equal_to_base() -> None:
    policy = Backoff(base=5.0, maximum=5.0)
    assert policy.ceiling(1) == 5.0
    assert policy.ceiling(100) == 5.0


def test_ceiling_is_monotonic() -> None:
    policy = Backoff(base=0.1, factor=1.7, maximum=300.0)
    ceilings = [policy.ceiling(n) for n in range(1, 200)]
    assert ceilings == sorted(ceilings)
    assert ceilings[-1] == 300.0


@pytest.mark.parametrize("failures", [0, -1, -10_000])
@pytest.mark.parametrize("method", ["ceiling", "delay"])
def test_failures_below_one_rejected(failures: int, method: str) -> None:
    policy = Backoff()
    with pytest.raises(ValueError, match=r"failures must be an integer >= 1") as info:
        if method == "ceiling":
            policy.ceiling(failures)
        else:
            policy.delay(failures, random.Random(0))
    assert repr(failures) in str(info.value)


def test_failures_bool_rejected() -> None:
    with pytest.raises(ValueError, match="failures"):
        Backoff().ceiling(True)


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"base": 0}, "base", "> 0"),
        ({"base": -1.0}, "base", "> 0"),
        ({"base": math.nan}, "base", "finite"),
        ({"base": math.inf}, "base", "finite"),
        ({"base": "1"}, "base", "finite"),
        ({"base": True}, "base", "finite"),
        ({"factor": 0.5}, "factor", ">= 1"),
        ({"factor": math.nan}, "factor", ">= 1"),
        ({"factor": math.inf}, "factor", "finite"),
        ({"maximum": 0.5}, "maximum", ">= base (1.0)"),
        ({"base": 10.0, "maximum": 9.0}, "maximum", ">= base (10.0)"),
        ({"maximum": math.inf}, "maximum", "finite"),
        ({"maximum": math.nan}, "maximum", "finite"),
    ],
)
def test_invalid_number_message(kwargs: dict[str, object], field: str, rule: str) -> None:
    with pytest.raises(ValueError) as info:
        Backoff(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"Backoff.{field} must be")
    assert rule in message
    assert repr(kwargs[field]) in message


def test_invalid_jitter_message() -> None:
    with pytest.raises(ValueError) as info:
        Backoff(jitter="random")
    message = str(info.value)
    assert "Backoff.jitter" in message
    assert "'random'" in message
    for mode in JITTER_MODES:
        assert repr(mode) in message


def test_integer_arguments_accepted() -> None:
    policy = Backoff(base=2, factor=3, maximum=100)
    assert policy.ceiling(3) == 18.0
    assert isinstance(policy.ceiling(3), float)


def test_none_jitter_returns_ceiling() -> None:
    policy = Backoff(jitter="none")
    rng = random.Random(3)
    for failures in range(1, 12):
        assert policy.delay(failures, rng) == policy.ceiling(failures)


def test_equal_jitter_range_and_mean() -> None:
    policy = Backoff(base=1.0, maximum=60.0, jitter="equal")
    ceiling = policy.ceiling(4)
    delays = draw_many(policy, 4)

    assert min(delays) >= ceiling / 2
    assert max(delays) <= ceiling
    assert statistics.fmean(delays) == pytest.approx(0.75 * ceiling, rel=0.01)


def test_equal_jitter_is_uniform_over_upper_half() -> None:
    policy = Backoff(jitter="equal")
    ceiling = policy.ceiling(5)
    delays = draw_many(policy, 5, seed=7)

    below_first_quarter = sum(d < 0.625 * ceiling for d in delays) / DRAWS
    below_middle = sum(d < 0.75 * ceiling for d in delays) / DRAWS
    assert below_first_quarter == pytest.approx(0.25, abs=0.02)
    assert below_middle == pytest.approx(0.5, abs=0.02)


def test_full_jitter_range_and_mean() -> None:
    policy = Backoff(jitter="full")
    ceiling = policy.ceiling(3)
    delays = draw_many(policy, 3)

    assert min(delays) >= 0.0
    assert max(delays) <= ceiling
    # Full jitter does retry almost at once sometimes, unlike equal jitter.
    assert min(delays) < 0.01 * ceiling
    assert statistics.fmean(delays) == pytest.approx(0.5 * ceiling, rel=0.02)


def test_decorrelated_first_delay_range() -> None:
    policy = Backoff(base=2.0, maximum=60.0, jitter="decorrelated")
    delays = draw_many(policy, 1)

    assert min(delays) >= 2.0
    assert max(delays) <= 6.0
    assert statistics.fmean(delays) == pytest.approx(4.0, rel=0.02)


def test_decorrelated_chain_stays_in_bounds() -> None:
    policy = Backoff(base=0.5, maximum=30.0, jitter="decorrelated")
    rng = random.Random(11)
    previous = None
    delays = []
    for failures in range(1, 2_000):
        previous = policy.delay(failures, rng, previous)
        delays.append(previous)

    assert min(delays) >= 0.5
    assert max(delays) <= 30.0
    # The chain grows: it reaches the cap and sits near it often.
    assert sum(d == 30.0 for d in delays) > 100


def test_decorrelated_ignores_failure_count() -> None:
    policy = Backoff(jitter="decorrelated")
    first = policy.delay(1, random.Random(5), previous=4.0)
    later = policy.delay(500, random.Random(5), previous=4.0)
    assert first == later


@pytest.mark.parametrize("previous", [-5.0, 0.0, math.nan, math.inf, 1e300])
def test_decorrelated_odd_previous_clamped(previous: float) -> None:
    policy = Backoff(base=1.0, maximum=20.0, jitter="decorrelated")
    rng = random.Random(2)
    delays = [policy.delay(1, rng, previous) for _ in range(500)]
    assert min(delays) >= 1.0
    assert max(delays) <= 20.0


@pytest.mark.parametrize("mode", JITTER_MODES)
def test_delay_never_above_maximum(mode: str) -> None:
    policy = Backoff(base=0.25, factor=3.0, maximum=7.5, jitter=mode)
    rng = random.Random(13)
    previous = None
    for failures in [1, 2, 3, 5, 8, 100, 10_000, 10**50]:
        for _ in range(200):
            previous = policy.delay(failures, rng, previous)
            assert 0.0 <= previous <= 7.5


@pytest.mark.parametrize("mode", JITTER_MODES)
def test_delay_repeats_with_same_seed(mode: str) -> None:
    policy = Backoff(jitter=mode)
    first = [policy.delay(n, random.Random(42)) for n in range(1, 20)]
    second = [policy.delay(n, random.Random(42)) for n in range(1, 20)]
    assert first == second
