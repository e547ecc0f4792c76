"""Row selection for the layer program: batch compaction and row routing.

When some samples of a batch leave at a layer (AdaDiff), the rest continue in a compact batch: the
active rows are selected (``active_indices``), gathered from the hidden states and from every pending
U-ViT skip tensor in one call (``gather_rows``), and the exited rows' outputs are written back to
their original batch positions (``scatter_rows``). When rows of one batch take different paths
(DuoDiff's backbones, multistage decoders, ASE's per-row kept blocks), :func:`split_rows` runs each
path on its rows and writes the results back.

Bucketed batches (AdaDiff's ``mode="bucketed"``): the active rows are padded up to the smallest
bucket of a fixed ladder (:func:`bucket_ladder`; ``runtime.graphs.choose_bucket`` picks one), so
every layer runs one of a few static shapes; :func:`partition_order` moves the rows that stay to
the front without a host read.

The native ops of ``duodiff_fast._C`` (``torch.ops.duodiff.active_indices / gather_rows /
scatter_rows_``) run where :func:`duodiff_fast.ops.impl.native` says they can for the tensors'
device; these PyTorch implementations otherwise. The results are the same.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch

from . import impl

__all__ = ["active_indices", "gather_rows", "scatter_rows", "split_rows", "take_rows", "bucket_ladder",
           "partition_order"]


def active_indices(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a (B,) bool mask, ascending, as (K,) int64."""
    if keep.dim() != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 1-D bool mask, got shape {tuple(keep.shape)} dtype {keep.dtype}")
    if impl.native(keep.device):
        return torch.ops.duodiff.active_indices(keep)
    return keep.nonzero().squeeze(1)


def _check_index(index: torch.Tensor, rows: int) -> None:
    # One min/max for the index, not one per tensor: on CUDA each read is a host synchronisation.
    if index.numel():
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= rows:
            raise IndexError(f"row index out of range for a tensor with {rows} rows (index spans [{lo}, {hi}])")


def gather_rows(tensors: Sequence[torch.Tensor], index: torch.Tensor, check: bool = True) -> List[torch.Tensor]:
    """Rows ``index`` (K,) of each (B, ...) tensor, as new contiguous (K, ...) tensors.

    All tensors must have the same number of rows B; the index is validated once for all of them
    (one host read on CUDA). ``check=False`` skips that read, for indices in range by construction
    (a permutation from :func:`partition_order`).
    """
    tensors = list(tensors)
    if not tensors:
        return []
    rows = tensors[0].shape[0]
    for t in tensors[1:]:
        if t.shape[0] != rows:
            raise ValueError(f"gather_rows needs tensors with the same number of rows, got {t.shape[0]} and {rows}")
    if check:
        _check_index(index, rows)
    device = tensors[0].device
    same_device = all(t.device == device for t in tensors) and (index.device == device or index.device.type == "cpu")
    if same_device and impl.native(device):
        return list(torch.ops.duodiff.gather_rows(tensors, index))
    return [t.index_select(0, index.to(t.device)) for t in tensors]


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write ``src`` (K, ...) into rows ``index`` (K,) of ``dst`` (B, ...) in place; returns dst."""
    if src.shape[0] != index.shape[0] or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"src of shape {tuple(src.shape)} does not fit rows {tuple(index.shape)} of dst {tuple(dst.shape)}"
        )
    if impl.native(dst.device) and src.device == dst.device:
        return torch.ops.duodiff.scatter_rows_(dst, index, src)
    dst.index_copy_(0, index, src.to(dst.dtype))
    return dst


def take_rows(t: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when ``index`` is None (every row), else its rows ``index``; None stays None."""
    if t is None or index is None:
        return t
    return t.index_select(0, index)


def split_rows(route: torch.Tensor, values: Iterable, run: Callable[[object, Optional[torch.Tensor]], torch.Tensor],
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run each route on its own rows and assemble the batch.

    Args:
        route: (B,) route of every row (bool, or long ids).
        values: the route values to run, in order; rows of other values keep ``out``'s content.
        run: ``run(value, index)`` -> (K, ...) result for the rows ``index`` (K,) of that route;
            ``index`` is None when every row takes the route (no gather, no scatter).
        out: (B, ...) tensor the results are written into (a new one is built from the first result
            when None; then every row must be served by ``values``).
    Returns:
        (B, ...) tensor (``out`` updated out of place).
    """
    batch = route.shape[0]
    for value in values:
        index = active_indices(route == value)
        k = index.numel()
        if k == 0:
            continue
        if k == batch:
            return run(value, None)
        part = run(value, index)
        if out is None:
            out = part.new_empty((batch, *part.shape[1:]))
        out = out.index_copy(0, index, part.to(out.dtype))
    if out is None:
        raise ValueError("split_rows: no row takes any of the given routes")
    return out


def bucket_ladder(batch: int, buckets: Optional[Sequence[int]] = None) -> List[int]:
    """The ascending batch sizes a shrinking batch is padded to; the largest is ``batch``.

    Default: the powers of two below ``batch``, then ``batch`` itself (13 -> [1, 2, 4, 8, 13]).
    Given ``buckets`` are sorted, the ones >= ``batch`` dropped and ``batch`` appended.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if buckets is None:
        ladder = [1 << k for k in range(batch.bit_length()) if (1 << k) < batch]
    else:
        buckets = list(buckets)
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be a non-empty list of positive ints, got {buckets!r}")
        ladder = sorted({b for b in buckets if b < batch})
    return ladder + [batch]


def partition_order(stay: torch.Tensor) -> torch.Tensor:
    """(P,) bool -> (P,) int64 permutation: the True rows first, each group in its original order.

    A stable sort, so the shape is static and no host read is needed (unlike ``nonzero``).
    """
    if stay.dim() != 1 or stay.dtype != torch.bool:
        raise ValueError(f"stay must be a 1-D bool mask, got shape {tuple(stay.shape)} dtype {stay.dtype}")
    return torch.sort((~stay).to(torch.int32), stable=True).indices
