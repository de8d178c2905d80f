"""Exponential backoff with jitter for retry delays.

Pure logic: randomness comes from an injected :class:`random.Random`, so tests
and callers control the seed. All times are in seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

#: Allowed values of :attr:`Backoff.jitter`.
JITTER_MODES: tuple[str, ...] = ("equal", "full", "decorrelated", "none")


def _check_number(field: str, value: object, rule: str, valid: bool) -> None:
    """Raise ValueError naming ``field``, its value and ``rule`` unless ``valid``."""
    if not valid:
        raise ValueError(f"Backoff.{field} must be {rule}, got {value!r}")


def _is_finite_number(value: object) -> bool:
    # bool is an int subclass, but True as a number of seconds is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delay policy: ``base * factor ** (failures - 1)``, capped and jittered.

    ``base`` and ``maximum`` are seconds. ``jitter`` is one of
    :data:`JITTER_MODES`:

    - ``"equal"`` (default): half the ceiling plus a uniform draw over the
      other half, so a retry never starts at once.
    - ``"full"``: a uniform draw between 0 and the ceiling.
    - ``"decorrelated"``: a uniform draw between ``base`` and three times the
      previous delay, capped at ``maximum``.
    - ``"none"``: the ceiling itself.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: str = "equal"

    def __post_init__(self) -> None:
        """Raise ValueError naming the first invalid field, its value and its range."""
        base_ok = _is_finite_number(self.base) and self.base > 0
        _check_number("base", self.base, "a finite number of seconds > 0", base_ok)

        factor_ok = _is_finite_number(self.factor) and self.factor >= 1
        _check_number("factor", self.factor, "a finite number >= 1", factor_ok)

        maximum_ok = _is_finite_number(self.maximum) and self.maximum >= self.base
        rule = f"a finite number of seconds >= base ({self.base!r})"
        _check_number("maximum", self.maximum, rule, maximum_ok)

        if self.jitter not in JITTER_MODES:
            allowed = ", ".join(repr(mode) for mode in JITTER_MODES)
            raise ValueError(f"Backoff.jitter must be one of {allowed}, got {self.jitter!r}")

    def ceiling(self, failures: int) -> float:
        """Return ``min(maximum, base * factor ** (failures - 1))`` in seconds.

        ``failures`` is the number of failed attempts so far (>= 1). Any count
        works, however large, because the growth is compared in log space
        before it is computed. Raises ValueError when ``failures`` < 1.
        """
        _check_failures(failures)
        exponent = failures - 1

        if self.factor == 1:
            return float(self.base)

        # Find the exponent at which the growth reaches the maximum, in log
        # space, so that a huge count never computes factor ** exponent.
        # Comparing an int with a float is exact in Python and cannot overflow.
        # The logs are subtracted, because maximum / base can overflow.
        headroom = math.log(self.maximum) - math.log(self.base)
        exponent_at_maximum = headroom / math.log(self.factor)
        if exponent >= exponent_at_maximum:
            return float(self.maximum)

        return float(min(self.maximum, self.base * float(self.factor) ** exponent))

    def delay(self, failures: int, rng: random.Random, previous: float | None = None) -> float:
        """Draw the delay in seconds before the next attempt.

        The result is in ``[0, maximum]`` for every mode, and in
        ``[base, maximum]`` for ``"decorrelated"``. ``previous`` is the last
        delay drawn for the same request. Only ``"decorrelated"`` reads it,
        and it treats None or NaN as ``base`` and clamps other values to
        ``[base, maximum]``. Raises ValueError when ``failures`` < 1.
        """
        _check_failures(failures)

        if self.jitter == "decorrelated":
            value = self._decorrelated(rng, previous)
        else:
            value = self._from_ceiling(self.ceiling(failures), rng)

        # Float rounding in uniform() could step a hair outside the bounds.
        return min(float(self.maximum), max(0.0, value))

    def _from_ceiling(self, ceiling: float, rng: random.Random) -> float:
        if self.jitter == "none":
            return ceiling
        if self.jitter == "full":
            return rng.uniform(0.0, ceiling)
        half = ceiling / 2
        return half + rng.uniform(0.0, half)

    def _decorrelated(self, rng: random.Random, previous: float | None) -> float:
        last = self.base if previous is None or math.isnan(previous) else previous
        last = min(float(self.maximum), max(float(self.base), last))
        return max(float(self.base), min(self.maximum, rng.uniform(self.base, 3 * last)))


def _check_failures(failures: int) -> None:
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        raise ValueError(
            f"failures must be an integer >= 1 (the number of failed attempts so "
            f"far), got {failures!r}"
        )
