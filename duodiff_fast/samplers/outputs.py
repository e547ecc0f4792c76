"""Writing samples: uint8 conversion, .npz archives, PNG grids and raw float tensors.

All writers are atomic (temporary file in the destination directory, then ``os.replace``), so an
interrupted run never leaves a truncated file behind.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..io_utils import atomic_write

__all__ = ["to_uint8", "save_npz", "load_npz", "save_png_grid", "make_grid", "save_tensor"]

PathLike = Union[str, "os.PathLike[str]"]


def _check_float_images(images, name: str = "images") -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, C, H, W) with B >= 1, got {tuple(images.shape)}")
    return images


def to_uint8(images) -> np.ndarray:
    """Float images (B, C, H, W) in [-1, 1] -> uint8 array (B, H, W, C) in [0, 255].

    Values are clamped to [-1, 1] and mapped by round((x + 1) * 127.5).
    """
    images = _check_float_images(images)
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _uint8_nhwc(images) -> np.ndarray:
    """Accept float (B, C, H, W) in [-1, 1] or already-converted uint8 (B, H, W, C)."""
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise ValueError(f"uint8 images must have shape (B, H, W, C), got {images.shape}")
        return images
    return to_uint8(images)


def save_npz(path: PathLike, images, labels=None, as_uint8: bool = True) -> None:
    """Save samples as an .npz with ``arr_0`` = images and ``arr_1`` = labels (B,).

    ``as_uint8=True`` (default): ``arr_0`` is uint8 (B, H, W, C), the layout FID evaluators for
    diffusion models read; ``images`` is float (B, C, H, W) in [-1, 1] or already uint8
    (B, H, W, C). ``as_uint8=False``: ``arr_0`` is the float array (B, C, H, W) as float32, without
    clamping (e.g. latents before decoding). ``labels``: optional (B,) integer class ids.
    """
    if as_uint8:
        arr = _uint8_nhwc(images)
    else:
        arr = _check_float_images(images).detach().cpu().float().numpy()
    arrays = {"arr_0": arr}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(
                f"labels must be an integer array of shape ({arr.shape[0]},), got shape {lab.shape} dtype {lab.dtype}"
            )
        arrays["arr_1"] = lab.astype(np.int64)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def load_npz(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an archive written by :func:`save_npz`: (uint8 images (B, H, W, C), labels or None)."""
    with np.load(path) as data:
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def make_grid(images, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile images into one uint8 (H_grid, W_grid, C) array, ``nrow`` images per row.

    Default ``nrow`` = ceil(sqrt(B)). Grid size: rows = ceil(B / nrow),
    H_grid = rows * (H + padding) + padding, W_grid = nrow * (W + padding) + padding.
    """
    arr = _uint8_nhwc(images)
    B, H, W, C = arr.shape
    if C not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels to be written as PNG, got {C}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(B))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    nrow = min(nrow, B)
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + padding) + padding, nrow * (W + padding) + padding, C), pad_value, np.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top : top + H, left : left + W] = arr[k]
    return grid


def save_png_grid(path: PathLike, images, nrow: Optional[int] = None, padding: int = 2) -> None:
    """Write images (float (B, C, H, W) in [-1, 1], C in {1, 3}) as one PNG grid (see make_grid)."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding)
    img = Image.fromarray(grid[:, :, 0], mode="L") if grid.shape[2] == 1 else Image.fromarray(grid, mode="RGB")
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")


def save_tensor(path: PathLike, images: Tensor, labels: Optional[Tensor] = None) -> None:
    """Save raw float samples (e.g. latents before decoding) without quantisation.

    ``.safetensors`` paths are written with safetensors (keys ``images`` and ``labels``), anything
    else with ``torch.save`` of a dict with the same keys.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    tensors = {"images": images.detach().cpu().contiguous()}
    if labels is not None:
        if not isinstance(labels, Tensor) or tuple(labels.shape) != (images.shape[0],):
            raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},)")
        tensors["labels"] = labels.detach().cpu().contiguous()
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save

        data = save(tensors)
        with atomic_write(path, "wb") as f:
            f.write(data)
    else:
        with atomic_write(path, "wb") as f:
            torch.save(tensors, f)
