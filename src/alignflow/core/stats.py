"""95% intervals for every number the pipeline compares, and paired differences where the data is paired.

    wilson(7, 40)                       # {"value": 0.175, "low": 0.087, "high": 0.320, "n": 40}
    mean_interval([1.2, 0.8, ...], seed=42)
    paired_difference(model, reference, seed=42)   # per prompt, same prompts on both sides

A proportion gets Wilson's score interval (it behaves at 0 and 1 and on small n, where the normal
approximation gives intervals outside [0, 1]). A mean, and a paired difference of two per-item series, gets a
seeded percentile bootstrap over the items (prompts, pairs, texts): resample the items with replacement,
`RESAMPLES` times, and take the 2.5th and 97.5th percentiles of the statistic. Resampling the items keeps the
pairing: both sides of a difference are drawn for the same prompts. The seed is the pipeline's seed, so the
same data gives the same interval byte for byte.

An interval is a dict `{"value", "low", "high", "n"}`, so that DVC flattens it into metrics that `dvc metrics
diff` and `dvc exp show` show side by side (`reward_mean.low`, `reward_mean.high`). A difference `holds` when its
interval excludes zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

RESAMPLES = 2000
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def interval(value: float | None, low: float | None, high: float | None, n: int) -> dict[str, Any]:
    return {"value": value, "low": low, "high": high, "n": n}


def wilson(successes: int, n: int) -> dict[str, Any]:
    """Wilson's score interval for a proportion successes / n (value None when n is 0)."""
    if n == 0:
        return interval(None, None, None, 0)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    low, high = (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)
    return interval(p, low, high, n)


def proportion(flags: Sequence[bool]) -> dict[str, Any]:
    return wilson(sum(bool(f) for f in flags), len(flags))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (position - below)


def bootstrap(statistic: Callable[[list[int]], float], n: int, seed: int) -> tuple[float, float]:
    """The 95% percentile interval of `statistic(indices)` over `RESAMPLES` draws of n indices with replacement."""
    rng = random.Random(f"bootstrap {seed}")
    draws = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(RESAMPLES))
    return _percentile(draws, 0.025), _percentile(draws, 0.975)


def mean_interval(values: Sequence[float], seed: int) -> dict[str, Any]:
    """The mean with its bootstrap interval over the items."""
    values = [float(v) for v in values]
    if not values:
        return interval(None, None, None, 0)
    if len(values) == 1:
        return interval(values[0], values[0], values[0], 1)
    low, high = bootstrap(lambda idx: math.fsum(values[i] for i in idx) / len(idx), len(values), seed)
    return interval(math.fsum(values) / len(values), low, high, len(values))


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int) -> dict[str, Any]:
    """mean(a) - mean(b) over the same items (a[i] and b[i] belong to item i), with a bootstrap interval that
    resamples items, and whether it `holds` (the interval excludes zero). Booleans count as 0 / 1."""
    if len(a) != len(b):
        raise ValueError(f"paired series differ in length: {len(a)} vs {len(b)}")
    result = mean_interval([float(x) - float(y) for x, y in zip(a, b)], seed)
    result["holds"] = holds(result)
    return result


def statistic_interval(statistic: Callable[[list[int]], float], n: int, seed: int) -> dict[str, Any]:
    """statistic(all items) with its bootstrap interval: `statistic` maps a list of item indices to a number."""
    if n == 0:
        return interval(None, None, None, 0)
    value = statistic(list(range(n)))
    low, high = bootstrap(statistic, n, seed) if n > 1 else (value, value)
    return interval(value, low, high, n)


def perplexity(nll: Sequence[float], tokens: Sequence[int], seed: int) -> dict[str, Any]:
    """exp(total NLL / total predicted tokens) over texts (nll[i], tokens[i]: text i's), bootstrap over texts."""
    return statistic_interval(lambda idx: math.exp(math.fsum(nll[i] for i in idx) / sum(tokens[i] for i in idx)), len(nll), seed)


def paired_perplexity_ratio(a: tuple[Sequence[float], Sequence[int]], b: tuple[Sequence[float], Sequence[int]],
                            seed: int) -> dict[str, Any]:
    """perplexity(a) / perplexity(b) on the same texts ((nll, tokens) per text for each model), resampling texts
    together; `holds`: the interval excludes 1."""
    (nll_a, tok_a), (nll_b, tok_b) = a, b
    if len(nll_a) != len(nll_b):
        raise ValueError(f"paired series differ in length: {len(nll_a)} vs {len(nll_b)}")

    def ratio(idx: list[int]) -> float:
        return math.exp(math.fsum(nll_a[i] for i in idx) / sum(tok_a[i] for i in idx)
                        - math.fsum(nll_b[i] for i in idx) / sum(tok_b[i] for i in idx))

    result = statistic_interval(ratio, len(nll_a), seed)
    result["holds"] = result["low"] is not None and (result["low"] > 1 or result["high"] < 1)
    return result


def holds(diff: dict[str, Any]) -> bool:
    """Whether an interval excludes zero (a difference beyond noise at 95%)."""
    return diff["low"] is not None and (diff["low"] > 0 or diff["high"] < 0)


def unpaired_difference(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """new - old for two independent estimates given as intervals: the normal approximation, each standard error
    read off its interval's width (used when the per-item data of the two is not at hand)."""
    if new["value"] is None or old["value"] is None:
        return {**interval(None, None, None, 0), "holds": False}
    se = math.hypot((new["high"] - new["low"]) / (2 * Z95), (old["high"] - old["low"]) / (2 * Z95))
    value = new["value"] - old["value"]
    result = interval(value, value - Z95 * se, value + Z95 * se, min(new["n"], old["n"]))
    result["holds"] = holds(result)
    return result


def fmt(value: dict[str, Any], digits: int = 3) -> str:
    """`0.175 [0.087, 0.320]`, or `n/a`."""
    if value.get("value") is None:
        return "n/a"
    return f"{value['value']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"
