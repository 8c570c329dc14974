"""A fixed-threshold chi-square goodness-of-fit test, without scipy."""

from __future__ import annotations

import math


def chi2_critical(dof: int, alpha: float = 1e-4) -> float:
    """Upper `alpha` quantile of chi-square(dof), Wilson-Hilferty approximation."""
    z = {1e-3: 3.090, 1e-4: 3.719, 1e-5: 4.265}[alpha]
    h = 2.0 / (9.0 * dof)
    return dof * (1 - h + z * math.sqrt(h)) ** 3


def chi2_statistic(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic with cells of small expectation pooled; returns (statistic, dof)."""
    cells = sorted(set(probs) | set(counts), key=lambda c: -probs.get(c, 0.0))
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for cell in cells:
        expected = probs.get(cell, 0.0) * n
        observed = counts.get(cell, 0)
        if expected >= min_expected:
            stat += (observed - expected) ** 2 / expected
            dof += 1
        else:
            pool_obs += observed
            pool_exp += expected
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        dof += 1
    elif pool_obs:
        return math.inf, max(dof, 1)  # mass where the exact distribution has none
    return stat, max(dof, 1)


def matches(counts: dict, probs: dict, n: int, alpha: float = 1e-4) -> tuple[bool, float, float]:
    stat, dof = chi2_statistic(counts, probs, n)
    crit = chi2_critical(dof, alpha)
    return stat < crit, stat, crit
