"""Statistics of repeated timings: median and interquartile range, stability, speedup intervals.

Every benchmark row keeps all its repeats; these functions turn them into the figures the tables
print. A speedup is the ratio of two rows' medians, with a percentile-bootstrap interval computed
by resampling the measurement *rounds* (the rows of a group are timed interleaved, one run of each
per round, so a round's pair of times saw the same machine load; resampling rounds keeps the pairs).
"""
from __future__ import annotations

import random
import statistics
from typing import Dict, List, Optional, Sequence

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
            seed: int = 0) -> Dict[str, float]:
    """median(base) / median(row) with a paired percentile-bootstrap interval over rounds.

    ``base_times[i]`` and ``times[i]`` must come from the same round. Returns dict(point, low, high,
    confidence, method).
    """
    if len(base_times) != len(times) or not times:
        raise ValueError(f"speedup needs paired rounds, got {len(base_times)} and {len(times)} timings")
    point = statistics.median(base_times) / statistics.median(times)
    rng = random.Random(seed)
    n = len(times)
    boots = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.median([base_times[i] for i in idx]) / statistics.median([times[i] for i in idx]))
    alpha = (1.0 - confidence) / 2
    return {"point": point, "low": quantile(boots, alpha), "high": quantile(boots, 1 - alpha),
            "confidence": confidence,
            "method": f"ratio of medians; paired percentile bootstrap over rounds ({resamples} resamples)"}
