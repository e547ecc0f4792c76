"""Interleaved timing of the rows being compared, with warm-up measured apart and failures kept.

:func:`time_interleaved` warms every entry up (first-call compilation, allocator growth,
autotuning, lazy imports happen there, and those seconds are returned separately), then runs
``repeats`` rounds, each running every entry once (A, B, C, ...; the order rotates every round so
that no entry always follows the same one). Machine noise therefore hits the compared entries alike,
and round i of one entry pairs with round i of another (see :func:`.stats.speedup`).

Clocks: "wall" (``time.perf_counter``, the device synchronised before and after each run: the
latency) or "process" (``time.process_time``: CPU seconds of this process, for a single-threaded CPU
run, where it equals the wall time on an idle machine but is not inflated by other processes
competing for the cores). Wall seconds are recorded in both cases.

An entry that raises is recorded as failed with its error text (type and message) and leaves the
rotation; the others go on. Nothing is swallowed: the caller turns the error into a failed row.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch

from .common import synchronize

__all__ = ["time_interleaved", "error_text"]


def error_text(exc: BaseException, limit: int = 500) -> str:
    """'Type: message' of an exception, shortened to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


CLOCKS = ("wall", "process")


def _timed(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> tuple:
    """(seconds on ``clock``, wall seconds) of one call."""
    synchronize(device)
    start, cpu0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    wall = time.perf_counter() - start
    return (wall if clock == "wall" else time.process_time() - cpu0), wall


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1,
                     desc: Optional[str] = None, progress: bool = True, clock: str = "wall") -> Dict[str, dict]:
    """Time ``fns`` round-robin.

    Returns, per key: ``warmup_s`` (wall seconds of each warm-up run), ``times_s`` (seconds on
    ``clock`` of each timed round, in round order), ``wall_s`` (wall seconds of the same runs) and ``error`` (None, or the error text of the run that failed; its
    ``failed_in`` says whether in warm-up or in which round).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = {k: {"warmup_s": [], "times_s": [], "wall_s": [], "error": None, "failed_in": None} for k in fns}
    alive: List[str] = []
    for key, fn in fns.items():
        try:
            for _ in range(max(int(warmup), 1)):  # at least one untimed run: first calls are never timed
                out[key]["warmup_s"].append(_timed(fn, device)[1])
            alive.append(key)
        except Exception as exc:  # noqa: BLE001 - recorded as this row's failure, printed by the caller
            out[key].update(error=error_text(exc), failed_in="warm-up")
    bar = None
    if progress and alive:
        from tqdm import tqdm

        bar = tqdm(total=repeats * len(alive), desc=desc, unit="run", leave=False, dynamic_ncols=True)
    try:
        for r in range(repeats):
            order = alive[r % len(alive):] + alive[: r % len(alive)] if alive else []
            for key in order:
                try:
                    t, wall = _timed(fns[key], device, clock)
                    out[key]["times_s"].append(t)
                    out[key]["wall_s"].append(wall)
                except Exception as exc:  # noqa: BLE001 - as above
                    out[key].update(error=error_text(exc), failed_in=f"round {r}")
                    alive.remove(key)
                if bar is not None:
                    bar.update(1)
            if not alive:
                break
    finally:
        if bar is not None:
            bar.close()
    return out
