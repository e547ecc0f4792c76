"""Device normalisation at the API boundary.

``torch.device("cuda") != torch.device("cuda:0")``: a device given without an index compares
unequal to the device of every tensor on it. Code that asks "is this tensor already on ``device``?"
(to avoid a copy, or a host synchronisation inside a CUDA-graph capture) must compare normalised
devices. :func:`normalize_device` is applied once where a user's device enters the package
(``sample``, ``PhiloxNoise``, ``GraphSampler``); everything after compares with ``==``.
"""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["normalize_device", "same_device"]

DeviceLike = Union[str, int, torch.device, None]


def normalize_device(device: DeviceLike, default: str = "cpu") -> torch.device:
    """``device`` as a ``torch.device`` with an explicit index for CUDA.

    "cuda" (no index) becomes "cuda:<current device>" -- the device tensors created with
    ``device="cuda"`` land on. None gives ``default``; "cpu" stays "cpu". The current CUDA device is
    read only for an index-less CUDA device, so this never initialises CUDA otherwise.
    """
    dev = torch.device(default) if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        dev = torch.device("cuda", index)
    return dev


def same_device(a: DeviceLike, b: DeviceLike) -> bool:
    """Whether ``a`` and ``b`` name the same device once normalised ("cuda" == "cuda:<current>")."""
    return normalize_device(a) == normalize_device(b)
