"""Rates with their sample size and a 95 % Wilson score interval.

A refusal score of 0.02 on 88 prompts and 0.05 on 88 prompts are not different findings; the interval says
so. Every rate refusal-lens reports in ``compare`` and MMLU results is a :class:`Rate`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials (``(nan, nan)`` when ``n == 0``).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at ``k = 0`` or ``k = n``.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes out of n={n} trials is impossible")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with the rate and its 95 % Wilson interval ``[lo, hi]``."""

    k: int
    n: int

    @classmethod
    def of(cls, flags) -> Rate:
        """From an iterable of booleans."""
        flags = [bool(f) for f in flags]
        return cls(sum(flags), len(flags))

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return asdict(self) | {"rate": self.rate, "ci95": [lo, hi]}

    @classmethod
    def from_dict(cls, d: dict) -> Rate:
        return cls(int(d["k"]), int(d["n"]))

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.rate:.3f} [{lo:.2f}, {hi:.2f}] (n={self.n})"
