"""Helpers shared by the benchmark scripts: device description, timing, result files."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

def device_name(device: torch.device) -> str:
    """Human-readable name of the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" ({os.cpu_count()} cores)"


def environment(device: torch.device) -> Dict[str, object]:
    """Versions and device facts recorded with every result file."""
    info: Dict[str, object] = {
        "device": device_name(device),
        "device_type": device.type,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def slug(text: str) -> str:
    """File-name-safe form of a device or config name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> List[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    On CUDA the device is synchronised before and after each run, so the time covers all the work
    the call queued (a whole sampling loop is long enough that event timing adds nothing).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times: List[float]) -> Dict[str, float]:
    """Median and spread of a list of timings (seconds)."""
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "spread_pct": 100.0 * (max(times) - min(times)) / med if med else 0.0,
        "repeats": len(times),
    }


def results_path(results_dir: str, prefix: str, device: torch.device, tag: str) -> str:
    """<results_dir>/<prefix>_<device>_<tag>.json"""
    return os.path.join(results_dir, f"{prefix}_{slug(device_name(device))}_{slug(tag)}.json")
