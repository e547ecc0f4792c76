"""Sharded, resumable sampling across processes (``torchrun --nproc_per_node=N``), and the final merge.

Sample indices 0 .. n-1 are cut into fixed shards of ``shard_size`` consecutive indices; shard k
goes to rank ``k % world_size``. Every sample's noise and label depend only on (seed, index), so
which rank (or how many ranks) draws a shard does not change it: 1 process and 8 produce the same
set. A shard is written once, atomically (``io_utils.atomic_write``), as
``<out>/shards/shard_<k>.npz`` holding ``arr_0`` (uint8 (n, H, W, C) images, or float32 latents),
``arr_1`` (labels, conditional models), ``indices`` (its global sample indices), ``fingerprint``
(the run's settings hash) and ``seconds`` (its compute time); optionally ``float`` (float32
(n, C, H, W) samples). A restarted run (any world size) skips shards that exist with the same
fingerprint and indices, so no sample is lost or drawn twice; a shard from a different run is an
error. Processes need no process group: rank 0 waits for every shard file, then merges them
(streamed, constant memory) into ``samples.npz`` (the layout FID tools read) plus a manifest.

All ranks must see the same output folder (one node, or a filesystem shared by the nodes).

Progress: each rank writes ``<out>/progress/rank<r>.json`` after every batch; rank 0 sums the
finished shards and those files into one tqdm bar (throughput and ETA across ranks).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..io_utils import atomic_write, atomic_write_json

__all__ = ["ShardPlan", "DistInfo", "dist_info", "set_local_device", "shard_path", "read_shard_header", "run_shards",
           "wait_for_shards", "merge_shards"]

SHARD_DIR = "shards"
PROGRESS_DIR = "progress"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Fixed shards of ``shard_size`` consecutive indices over ``n_samples`` samples."""

    n_samples: int
    shard_size: int

    def __post_init__(self):
        for name in ("n_samples", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def shard_range(self, k: int) -> Tuple[int, int]:
        """[start, stop) sample indices of shard k."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range [0, {self.num_shards})")
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_samples)

    def shards_of_rank(self, rank: int, world_size: int) -> List[int]:
        """The shards rank ``rank`` of ``world_size`` draws: k with k % world_size == rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, {world_size})")
        return list(range(rank, self.num_shards, world_size))


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def set_local_device(device):
    """Make ``device`` this process's current CUDA device, as training does (``torch.cuda.set_device``).

    Everything that defaults to the current device -- Triton launches, ``torch.cuda.Stream()``,
    CUDA-graph capture, NCCL -- then runs on this rank's GPU instead of GPU 0. A CPU device is left
    alone. Returns ``device`` (a ``torch.device``).
    """
    import torch

    from ..errors import DeviceUnavailable

    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            raise ValueError("set_local_device needs a CUDA device with an index (cuda:N)")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index >= count:
            raise DeviceUnavailable(f"device {device} was asked for but this machine has {count} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"shard_{k:06d}.npz")


def read_shard_header(path: str) -> Tuple[str, np.ndarray]:
    """(fingerprint, indices) of a shard file, without reading its images."""
    with np.load(path, allow_pickle=False) as data:
        return str(data["fingerprint"]), data["indices"]


def _shard_done(out_dir: str, plan: ShardPlan, k: int, fingerprint: str) -> bool:
    """True if shard k exists and belongs to this run; raise if it belongs to another run."""
    path = shard_path(out_dir, k)
    if not os.path.isfile(path):
        return False
    try:
        fp, idx = read_shard_header(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it to redraw that shard") from e
    if fp != fingerprint:
        raise ValueError(f"{path} was written by a run with other settings (fingerprint {fp[:12]} vs "
                         f"{fingerprint[:12]}): use a new --out folder, or delete {os.path.dirname(path)}")
    start, stop = plan.shard_range(k)
    # A shorter last shard of an earlier, smaller run is redrawn with the full range.
    return idx.shape == (stop - start,) and bool((idx == np.arange(start, stop)).all())


def _remove_stale_temp(out_dir: str, k: int) -> None:
    """Delete temporary files a killed writer of shard k left (only shard k's owner rank writes them)."""
    prefix = "." + os.path.basename(shard_path(out_dir, k)) + "."
    folder = os.path.join(out_dir, SHARD_DIR)
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def _write_progress(out_dir: str, rank: int, shard: int, done: int) -> None:
    atomic_write_json(os.path.join(out_dir, PROGRESS_DIR, f"rank{rank}.json"), {"shard": shard, "done": done})


def _count_done(out_dir: str, plan: ShardPlan) -> int:
    """Samples finished across ranks: complete shard files plus each rank's shard in progress."""
    finished = set()
    total = 0
    for k in range(plan.num_shards):
        if os.path.isfile(shard_path(out_dir, k)):
            finished.add(k)
            start, stop = plan.shard_range(k)
            total += stop - start
    pdir = os.path.join(out_dir, PROGRESS_DIR)
    for name in os.listdir(pdir) if os.path.isdir(pdir) else ():
        try:
            with open(os.path.join(pdir, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue  # being replaced right now: counted on the next poll
        if rec.get("shard") not in finished and 0 <= int(rec.get("shard", -1)) < plan.num_shards:
            total += int(rec.get("done", 0))
    return total


class _ProgressBar:
    """A tqdm bar over all ranks' samples, refreshed from the files by a background thread."""

    def __init__(self, out_dir: str, plan: ShardPlan, enabled: bool, period: float = 1.0):
        self.out_dir, self.plan, self.period = out_dir, plan, period
        self._stop = threading.Event()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            start = _count_done(out_dir, plan)
            self.bar = tqdm(total=plan.n_samples, initial=start, desc="sample (all ranks)", unit="img",
                            dynamic_ncols=True)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):
            self.refresh()

    def refresh(self):
        if self.bar is not None:
            n = min(_count_done(self.out_dir, self.plan), self.plan.n_samples)
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)

    def close(self):
        if self.bar is not None:
            self._stop.set()
            self._thread.join()
            self.refresh()
            self.bar.close()


# produce(start, count) -> (samples (count, C, H, W) float CPU tensor or array, labels (count,) or None)
Producer = Callable[[int, int], Tuple[object, Optional[np.ndarray]]]


def _store_arrays(samples, labels, as_uint8: bool, keep_float: bool) -> Dict[str, np.ndarray]:
    from ..samplers.outputs import to_uint8

    x = samples.detach().float().cpu().numpy() if hasattr(samples, "detach") else np.asarray(samples, np.float32)
    out = {"arr_0": to_uint8(x) if as_uint8 else x.astype(np.float32)}
    if labels is not None:
        out["arr_1"] = np.asarray(labels, dtype=np.int64)
    if keep_float and as_uint8:
        out["float"] = x.astype(np.float32)
    return out


def run_shards(out_dir: str, plan: ShardPlan, produce: Producer, fingerprint: str, batch_size: int,
               dist: DistInfo, as_uint8: bool = True, keep_float: bool = False, progress: bool = True) -> List[int]:
    """Draw this rank's missing shards; returns the shard ids it drew (skipped ones excluded).

    ``produce(start, count)`` draws samples start .. start+count-1 (count <= batch_size).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    os.makedirs(os.path.join(out_dir, SHARD_DIR), exist_ok=True)
    mine = [k for k in plan.shards_of_rank(dist.rank, dist.world_size) if not _shard_done(out_dir, plan, k, fingerprint)]
    bar = _ProgressBar(out_dir, plan, progress and dist.rank == 0)
    drawn = []
    try:
        for k in mine:
            _remove_stale_temp(out_dir, k)
            start, stop = plan.shard_range(k)
            t0 = time.perf_counter()
            parts: Dict[str, list] = {}
            for b0 in range(start, stop, batch_size):
                b = min(batch_size, stop - b0)
                samples, labels = produce(b0, b)
                for key, arr in _store_arrays(samples, labels, as_uint8, keep_float).items():
                    parts.setdefault(key, []).append(arr)
                _write_progress(out_dir, dist.rank, k, b0 + b - start)
            arrays = {key: np.concatenate(v) for key, v in parts.items()}
            arrays.update(indices=np.arange(start, stop, dtype=np.int64), fingerprint=np.array(fingerprint),
                          seconds=np.float64(time.perf_counter() - t0))
            with atomic_write(shard_path(out_dir, k), "wb") as f:
                np.savez(f, **arrays)
            drawn.append(k)
        if dist.rank == 0:
            wait_for_shards(out_dir, plan)  # rank 0 keeps the bar until every rank's shards are on disk
    finally:
        bar.close()
    return drawn


def wait_for_shards(out_dir: str, plan: ShardPlan, poll: float = 0.5, timeout: Optional[float] = None) -> None:
    """Block until every shard file exists (the other ranks' included)."""
    t0 = time.monotonic()
    while True:
        missing = [k for k in range(plan.num_shards) if not os.path.isfile(shard_path(out_dir, k))]
        if not missing:
            return
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(missing)} shard(s) still missing after {timeout:.0f}s, e.g. {missing[:5]}")
        time.sleep(poll)


def _write_npy_member(zf: zipfile.ZipFile, name: str, dtype, shape, chunks) -> None:
    """Write one .npy member of an .npz from C-ordered chunks (never the whole array in memory)."""
    with zf.open(name + ".npy", "w", force_zip64=True) as out:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(out, header)
        for chunk in chunks:
            out.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def merge_shards(out_dir: str, plan: ShardPlan, fingerprint: str, out_name: str = "samples.npz") -> Dict[str, object]:
    """Check every shard (fingerprint, exact index coverage) and stream them into ``<out>/<out_name>``.

    Returns {"path", "count", "shape", "dtype", "has_labels", "shard_seconds"}.
    """
    headers = []
    for k in range(plan.num_shards):
        path = shard_path(out_dir, k)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {k} is missing: {path}")
        fp, idx = read_shard_header(path)
        if fp != fingerprint:
            raise ValueError(f"{path} belongs to another run (fingerprint {fp[:12]} vs {fingerprint[:12]})")
        start, stop = plan.shard_range(k)
        if idx.shape != (stop - start,) or not (idx == np.arange(start, stop)).all():
            raise ValueError(f"{path} holds indices {idx[:3]}..., expected {start}..{stop - 1}")
        headers.append(path)
    with np.load(headers[0], allow_pickle=False) as d0:
        item_shape, dtype = d0["arr_0"].shape[1:], d0["arr_0"].dtype
        has_labels = "arr_1" in d0.files
    seconds = 0.0
    for path in headers:
        with np.load(path, allow_pickle=False) as d:  # members are read lazily: no images here
            seconds += float(d["seconds"])
            if ("arr_1" in d.files) != has_labels:
                raise ValueError(f"{path} does not match the other shards: labels present in some only")

    def chunks(key):
        for path in headers:
            with np.load(path, allow_pickle=False) as d:
                arr = d[key]
            if key == "arr_0" and (arr.shape[1:] != item_shape or arr.dtype != dtype):
                # raising inside the atomic write leaves no partial samples.npz behind
                raise ValueError(f"{path} holds samples {arr.shape[1:]} {arr.dtype}, the first shard "
                                 f"{item_shape} {dtype}")
            yield arr

    target = os.path.join(out_dir, out_name)
    with atomic_write(target, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0", dtype, (plan.n_samples, *item_shape), chunks("arr_0"))
            if has_labels:
                _write_npy_member(zf, "arr_1", np.int64, (plan.n_samples,), chunks("arr_1"))
    return {"path": target, "count": plan.n_samples, "shape": [plan.n_samples, *item_shape],
            "dtype": str(dtype), "has_labels": has_labels, "shard_seconds": seconds}


def load_float_samples(out_dir: str, plan: ShardPlan):
    """All shards' ``float`` arrays concatenated (N, C, H, W), or None when the shards have none."""
    arrays = []
    for k in range(plan.num_shards):
        with np.load(shard_path(out_dir, k), allow_pickle=False) as d:
            if "float" not in d.files:
                return None
            arrays.append(d["float"])
    return np.concatenate(arrays)
