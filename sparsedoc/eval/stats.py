"""Small statistics shared by the scorers and the report: Wilson intervals for accuracies,
percentile-bootstrap intervals for mean scores, mean and sample standard deviation over seeds."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, as fractions in [0, 1].

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is sensible at 0/n and n/n,
    which small benchmark slices hit. ``n == 0`` gives ``(nan, nan)``.
    """
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: list[float], samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (items resampled with
    replacement, ``samples`` times, seeded). Empty input gives ``(nan, nan)``."""
    n = len(values)
    if n == 0 or samples == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int(math.floor((1 - level) / 2 * (samples - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (samples - 1)))]
    return (lo, hi)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (n - 1 in the denominator, as seed studies report);
    the std of a single value is nan (undefined), never 0."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, math.nan)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return (mean, math.sqrt(var))
