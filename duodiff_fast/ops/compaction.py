"""Batch compaction for the shrinking-batch early exit.

When some samples of a batch leave at a layer, the rest continue in a compact batch: the active
rows are selected (``active_indices``), gathered from the hidden states and from every pending
U-ViT skip tensor (``gather_rows``), and the exited rows' outputs are written back to their
original batch positions (``scatter_rows``). They run the native ops of ``duodiff_fast._C``
(``torch.ops.duodiff.active_indices / gather_rows / scatter_rows_``) when the extension is built
and these PyTorch reference implementations otherwise (one warning); the results are the same.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .. import _native


def active_indices(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a (B,) bool mask, ascending, as (K,) int64."""
    if keep.dim() != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 1-D bool mask, got shape {tuple(keep.shape)} dtype {keep.dtype}")
    if _native.available():
        return torch.ops.duodiff.active_indices(keep)
    return keep.nonzero().squeeze(1)


def gather_rows(tensors: Sequence[torch.Tensor], index: torch.Tensor) -> List[torch.Tensor]:
    """Rows ``index`` (K,) of each (B, ...) tensor, as new contiguous (K, ...) tensors."""
    out = []
    for t in tensors:
        if index.numel() and (int(index.max()) >= t.shape[0] or int(index.min()) < 0):
            raise IndexError(f"row index out of range for a tensor with {t.shape[0]} rows")
    if _native.available() and all(t.device == index.device or index.device.type == "cpu" for t in tensors):
        return list(torch.ops.duodiff.gather_rows(list(tensors), index))
    for t in tensors:
        out.append(t.index_select(0, index))
    return out


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write ``src`` (K, ...) into rows ``index`` (K,) of ``dst`` (B, ...) in place; returns dst."""
    if src.shape[0] != index.shape[0] or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"src of shape {tuple(src.shape)} does not fit rows {tuple(index.shape)} of dst {tuple(dst.shape)}"
        )
    if _native.available():
        return torch.ops.duodiff.scatter_rows_(dst, index, src)
    dst.index_copy_(0, index, src.to(dst.dtype))
    return dst
