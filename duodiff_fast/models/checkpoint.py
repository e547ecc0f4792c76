"""Safe checkpoint loading for U-ViT models.

Accepted files:
  * plain state dicts with the official key names (the published U-ViT ``nnet*.pth`` files);
  * dicts holding the weights under ``model_state_dict`` (the DuoDiff authors' trainer and this
    package's trainer), ``ema_state_dict``/``ema`` on request, or ``state_dict``;
  * ``.safetensors`` files.
Torch files are read with ``weights_only=True``: no pickled code runs. A ``module.`` prefix left by
DistributedDataParallel is removed. Mismatches produce one error listing the missing and
unexpected keys and the shape mismatches, and naming the registered configs the checkpoint fits.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, List, Mapping, Optional, Union

import torch

from .configs import matching_configs

StateDict = Dict[str, torch.Tensor]

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def read_checkpoint_file(path: Union[str, os.PathLike]) -> Mapping[str, object]:
    """Read a checkpoint file safely (safetensors, or torch with ``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is a core dependency
            raise CheckpointError("reading .safetensors files needs the 'safetensors' package") from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {e}") from e
    except Exception as e:  # weights_only refuses pickled objects with an UnpicklingError
        raise CheckpointError(
            f"{path} could not be loaded with weights_only=True (it holds objects other than "
            f"tensors and plain containers, or is corrupt): {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def extract_state_dict(obj: Mapping[str, object], use_ema: bool = False) -> StateDict:
    """Find the model weights in a loaded checkpoint object and strip a DDP ``module.`` prefix."""
    if use_ema:
        for key in ("ema_state_dict", "ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                f"use_ema=True but the checkpoint has no 'ema_state_dict' (top-level keys: {sorted(obj)[:12]})"
            )
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            "checkpoint is not a state dict: entries that are not tensors: "
            f"{non_tensors[:8]}{' ...' if len(non_tensors) > 8 else ''}"
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Recover the UViT constructor keywords from a state dict's keys and shapes.

    ``num_heads`` cannot be read from weights: it is taken from a registered config of the same
    width when one exists, otherwise embed_dim // 64.
    """
    try:
        pe = state_dict["patch_embed.proj.weight"]  # (D, C, p, p)
        pos = state_dict["pos_embed"]  # (1, extras + L, D)
    except KeyError as e:
        raise CheckpointError(f"not a U-ViT state dict: missing key {e.args[0]!r}") from None
    embed_dim, in_chans, patch = int(pe.shape[0]), int(pe.shape[1]), int(pe.shape[2])
    num_classes = int(state_dict["label_emb.weight"].shape[0]) if "label_emb.weight" in state_dict else -1
    extras = 2 if num_classes > 0 else 1
    num_patches = int(pos.shape[1]) - extras
    grid = int(round(num_patches ** 0.5))
    n_in = len({k.split(".")[1] for k in state_dict if k.startswith("in_blocks.")})
    hidden = int(state_dict["mid_block.mlp.fc1.weight"].shape[0]) if "mid_block.mlp.fc1.weight" in state_dict else 4 * embed_dim
    config = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=2 * n_in, num_heads=None, mlp_ratio=hidden // embed_dim if hidden % embed_dim == 0 else hidden / embed_dim,
        qkv_bias="mid_block.attn.qkv.bias" in state_dict, qk_scale=None,
        mlp_time_embed="time_embed.0.weight" in state_dict, num_classes=num_classes,
        conv="final_layer.weight" in state_dict,
        skip=any(k.endswith("skip_linear.weight") for k in state_dict) or n_in == 0,
    )
    from .configs import REGISTRY

    widths = {s.kwargs["embed_dim"]: s.kwargs["num_heads"] for s in REGISTRY.values()}
    config["num_heads"] = widths.get(embed_dim, max(1, embed_dim // 64))
    return config


def key_mismatch_lines(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str = "checkpoint") -> List[str]:
    """Lines describing how ``sd`` differs from ``model``'s state dict (empty when it fits).

    Lists missing keys, unexpected keys and shape mismatches (the first few of each).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(own[k].shape) != tuple(sd[k].shape)
    )
    if not (missing or unexpected or shapes):
        return []

    def fmt(items, n=10):
        return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")

    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {fmt(shapes, 6)}")
    return lines


def _mismatch_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    lines = key_mismatch_lines(model, sd)
    if not lines:
        return None
    try:
        cfg = infer_config(sd)
        fits = matching_configs(cfg)
        if fits:
            lines.append(f"  the checkpoint fits config(s): {', '.join(fits)}")
        else:
            shown = {k: v for k, v in cfg.items() if k not in ("qk_scale",)}
            lines.append(f"  the checkpoint looks like UViT({shown}), which is not a registered config")
    except CheckpointError:
        lines.append("  the checkpoint does not look like a U-ViT state dict")
    return "\n".join(lines)


def load_weights(
    model: torch.nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, object]],
    use_ema: bool = False,
) -> torch.nn.Module:
    """Load a checkpoint (path or already-loaded dict) into ``model`` strictly; returns the model.

    Raises :class:`CheckpointError` before touching the model's parameters when keys or shapes
    differ, listing the differences and the registered configs the checkpoint would fit.
    """
    obj = read_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = extract_state_dict(obj, use_ema=use_ema)
    report = _mismatch_report(model, sd)
    if report:
        where = f" ({os.fspath(checkpoint)})" if isinstance(checkpoint, (str, os.PathLike)) else ""
        raise CheckpointError(report.replace("checkpoint", f"checkpoint{where}", 1))
    model.load_state_dict(sd, strict=True)
    return model


def load_model(
    checkpoint: Union[str, os.PathLike, Mapping[str, object]],
    config: Optional[Union[str, Dict[str, object]]] = None,
    use_ema: bool = False,
):
    """Build a UViT and load ``checkpoint`` into it.

    ``config`` is a registry name, a dict of constructor keywords, or None to infer the
    architecture from the weights (see :func:`infer_config`).
    """
    from .configs import create_model
    from .uvit import UViT

    obj = read_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if config is None:
        model = UViT(**infer_config(extract_state_dict(obj, use_ema=use_ema)))
    elif isinstance(config, str):
        model = create_model(config)
    else:
        model = UViT(**config)
    try:
        return load_weights(model, obj, use_ema=use_ema)
    except CheckpointError as e:
        if isinstance(checkpoint, (str, os.PathLike)):
            raise CheckpointError(f"{os.fspath(checkpoint)}: {e}") from None
        raise


def save_weights(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the model's state dict atomically (``.safetensors`` by extension, else torch)."""
    from ..io_utils import atomic_torch_save, atomic_write_bytes

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save

        atomic_write_bytes(path, save(sd))
    else:
        atomic_torch_save(sd, path)
