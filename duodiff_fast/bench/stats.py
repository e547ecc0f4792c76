"""Statistics of repeated timings: median and interquartile range, stability, speedup intervals.

Every benchmark row keeps all its repeats; these functions turn them into the figures the tables
print. The rows of a group are timed interleaved, one run of each per round, so a round's pair of
times saw the same machine state. A speedup is therefore the median of the per-round ratios
base_i / row_i, with a percentile-bootstrap interval computed by resampling the rounds, and its
stability is the spread (IQR) of those paired ratios: a slow drift of the whole machine (CPU
frequency, a neighbour on the host) moves both times of a round together and cancels in the ratio,
while it inflates each row's own IQR. Each row's own IQR is still reported and judged for its time.
"""
from __future__ import annotations

import random
import statistics
from typing import Dict, Optional, Sequence

__all__ = ["quantile", "summarize", "is_unstable", "speedup", "DEFAULT_UNSTABLE_IQR_PCT"]

# A row whose interquartile range exceeds this share of its median is marked unstable.
DEFAULT_UNSTABLE_IQR_PCT = 10.0


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float], unstable_iqr_pct: float = DEFAULT_UNSTABLE_IQR_PCT) -> Dict[str, object]:
    """Median, quartiles, IQR (% of the median), min/max and every repeat of a list of seconds.

    ``unstable`` is True when the IQR exceeds ``unstable_iqr_pct`` % of the median, or when there
    are fewer than 3 repeats (no spread can be judged).
    """
    ts = [float(t) for t in times]
    if not ts:
        raise ValueError("no timings to summarize")
    med = statistics.median(ts)
    q1, q3 = quantile(ts, 0.25), quantile(ts, 0.75)
    iqr_pct = 100.0 * (q3 - q1) / med if med > 0 else 0.0
    return {
        "median_s": med,
        "q1_s": q1,
        "q3_s": q3,
        "iqr_pct": iqr_pct,
        "min_s": min(ts),
        "max_s": max(ts),
        "repeats": len(ts),
        "unstable": bool(len(ts) < 3 or iqr_pct > unstable_iqr_pct),
        "unstable_threshold_iqr_pct": float(unstable_iqr_pct),
        "times_s": ts,
    }


def is_unstable(stats: Optional[dict]) -> bool:
    return bool(stats is None or stats.get("unstable", True))


def speedup(base_times: Sequence[float], times: Sequence[float], resamples: int = 2000, confidence: float = 0.95,
            seed: int = 0, unstable_spread_pct: float = DEFAULT_UNSTABLE_IQR_PCT) -> Dict[str, object]:
    """Median of the paired ratios base_i / row_i, with a percentile-bootstrap interval over rounds.

    ``base_times[i]`` and ``times[i]`` must come from the same round. Returns dict(point, low, high,
    confidence, spread_pct (IQR of the paired ratios, % of their median), unstable (spread_pct above
    ``unstable_spread_pct``, or fewer than 3 rounds), ratios (every round's), method).
    """
    if len(base_times) != len(times) or not times:
        raise ValueError(f"speedup needs paired rounds, got {len(base_times)} and {len(times)} timings")
    ratios = [float(b) / float(t) for b, t in zip(base_times, times)]
    point = statistics.median(ratios)
    spread_pct = 100.0 * (quantile(ratios, 0.75) - quantile(ratios, 0.25)) / point if point > 0 else 0.0
    rng = random.Random(seed)
    n = len(ratios)
    boots = [statistics.median([ratios[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples)]
    alpha = (1.0 - confidence) / 2
    return {"point": point, "low": quantile(boots, alpha), "high": quantile(boots, 1 - alpha),
            "confidence": confidence, "spread_pct": spread_pct,
            "unstable": bool(n < 3 or spread_pct > unstable_spread_pct), "ratios": ratios,
            "method": f"median of per-round ratios; percentile bootstrap over rounds ({resamples} resamples)"}
