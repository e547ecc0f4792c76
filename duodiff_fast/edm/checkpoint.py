"""EDM model files: EDM's (and the multistage authors') exported state dicts, and this package's file.

EDM and the multistage authors release pickles that hold their code; the package never unpickles
them. A user exports the weights once, with their code on the path (EDM's repository root)::

    import pickle, torch, dnnlib
    with dnnlib.util.open_url("edm-cifar10-32x32-uncond-vp.pkl") as f: net = pickle.load(f)["ema"]
    torch.save(net.state_dict(), "edm-cifar10-uncond.pt")

(the two lines after the import are the ones that matter), then ``duodiff-fast convert`` checks the
state dict against a config (named, or inferred from the tensor shapes) and writes this package's
file: ``{"format": "duodiff-fast-edm-1", "config": {...}, "state_dict": {...}}``, read back with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..io_utils import atomic_torch_save
from .configs import EDM_CONFIGS, build_edm_net, get_edm_config, normalize_config

__all__ = ["EDM_FORMAT", "infer_edm_config", "load_edm_state_dict", "read_edm_file", "save_edm_file",
           "load_edm_net", "convert_edm_state_dict"]

EDM_FORMAT = "duodiff-fast-edm-1"
_PREFIXES = ("module.", "_orig_mod.")


def _strip(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = dict(sd)
    for p in _PREFIXES:
        if out and all(k.startswith(p) for k in out):
            out = {k[len(p):]: v for k, v in out.items()}
    return out


def infer_edm_config(sd: Mapping[str, torch.Tensor], stage_interval=None) -> Dict[str, Any]:
    """An EDM-preconditioned DDPM++ config from a state dict's names and shapes.

    Reads resolution and widths from ``model.enc.*`` / ``model.dec(s).*``; a multistage state dict
    (``model.decs.{s}.*``) needs ``stage_interval`` (it is not stored in the weights; default the
    authors' CIFAR-10 intervals)."""
    sd = _strip(sd)
    if not any(k.startswith("model.enc.") for k in sd):
        raise ValueError("not an EDM U-Net state dict: no 'model.enc.*' keys (export net.state_dict() of "
                         "EDM's EDMPrecond; see duodiff_fast.edm.checkpoint)")
    conv = [k for k in sd if re.fullmatch(r"model\.enc\.(\d+)x\1_conv\.weight", k)]
    if len(conv) != 1:
        raise ValueError(f"expected one model.enc.<res>x<res>_conv.weight, found {conv}")
    res = int(re.match(r"model\.enc\.(\d+)x", conv[0]).group(1))
    w = sd[conv[0]]
    model_channels, img_channels = int(w.shape[0]), int(w.shape[1])
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"model\.enc\.(\d+)x\d+_", k)] if m},
                    reverse=True)
    num_blocks = len({m.group(1) for k in sd for m in [re.match(rf"model\.enc\.{res}x{res}_block(\d+)\.", k)] if m})
    channel_mult = []
    for r in levels:
        out = sd[f"model.enc.{r}x{r}_block{num_blocks - 1}.conv1.weight"].shape[0]
        if out % model_channels:
            raise ValueError(f"width {out} at {r}x{r} is not a multiple of model_channels {model_channels}")
        channel_mult.append(out // model_channels)
    attn = sorted({r for r in levels if f"model.enc.{r}x{r}_block0.qkv.weight" in sd}, reverse=True)
    emb_channels = int(sd["model.map_layer0.weight"].shape[0])
    noise_channels = int(sd["model.map_layer0.weight"].shape[1])
    cfg: Dict[str, Any] = dict(
        precond="edm", img_resolution=res, img_channels=img_channels,
        label_dim=int(sd["model.map_label.weight"].shape[1]) if "model.map_label.weight" in sd else 0,
        augment_dim=int(sd["model.map_augment.weight"].shape[1]) if "model.map_augment.weight" in sd else 0,
        channel_mult=channel_mult, channel_mult_emb=emb_channels // model_channels,
        channel_mult_noise=noise_channels // model_channels, num_blocks=num_blocks, attn_resolutions=attn,
        embedding_type="fourier" if "model.map_noise.freqs" in sd else "positional",
        encoder_type="standard", decoder_type="standard", dropout=0.0)
    if "model.enc.{0}x{0}_down.conv0.resample_filter".format(levels[1] if len(levels) > 1 else res) in sd:
        f = sd["model.enc.{0}x{0}_down.conv0.resample_filter".format(levels[1])][0, 0]
        taps = f.sum(0) / f.sum(0)[0]  # the separable filter up to scale, e.g. [1, 1] or [1, 3, 3, 1]
        cfg["resample_filter"] = [int(round(float(v))) for v in taps]
    decs = sorted({int(m.group(1)) for k in sd for m in [re.match(r"model\.decs\.(\d+)\.", k)] if m})
    if decs:
        last = f"{res}x{res}_aux_conv.weight"
        cfg.update(model_type="MultistageUNet", en_model_channels=model_channels, stage_num=len(decs),
                   de_model_channels=[int(sd[f"model.decs.{s}.{res}x{res}_block{num_blocks}.conv1.weight"].shape[0])
                                      // channel_mult[0] for s in decs],
                   stage_interval=stage_interval if stage_interval is not None else
                   [[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]])
        if len(cfg["stage_interval"]) != len(decs):
            raise ValueError(f"{len(decs)} decoders but {len(cfg['stage_interval'])} stage intervals")
        if decs != list(range(len(decs))) or not all(f"model.decs.{s}.{last}" in sd for s in decs):
            raise ValueError(f"multistage decoders must be model.decs.0..{len(decs) - 1}, each with {last}")
    else:
        cfg.update(model_type="SongUNet", model_channels=model_channels)
    return cfg


def load_edm_state_dict(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]):
    """Build ``config``'s net and load ``sd`` strictly; a mismatch names the differing keys."""
    net = build_edm_net(dict(config))
    sd = _strip(sd)
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"state dict does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {sorted(shapes)[:5]}")
    net.load_state_dict(sd, strict=True)
    return net


def save_edm_file(net, config: Mapping[str, Any], path: str) -> None:
    """Atomically write the package's EDM file for ``net`` built from ``config``."""
    atomic_torch_save({"format": EDM_FORMAT, "config": normalize_config(dict(config)),
                       "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, path)


def read_edm_file(path: str) -> Tuple[Optional[Dict[str, Any]], Dict[str, torch.Tensor]]:
    """(config or None, state dict) of a package EDM file or a bare exported state dict (weights_only)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict):
        raise ValueError(f"{path!r} holds a {type(blob).__name__}, not a state dict")
    if blob.get("format") == EDM_FORMAT:
        return dict(blob["config"]), dict(blob["state_dict"])
    if "format" in blob:
        raise ValueError(f"{path!r} is a {blob['format']!r} file, not an EDM model")
    if not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"{path!r} is neither a duodiff-fast EDM file nor a bare state dict (tensor values)")
    return None, blob


def load_edm_net(path: str, config: Optional[str] = None):
    """(net, config dict) from ``path``: its own config, or the named ``config`` (they must agree when both)."""
    own, sd = read_edm_file(path)
    if config not in (None, "auto"):
        named = normalize_config(get_edm_config(config))
        if own is not None and normalize_config(own) != named:
            raise ValueError(f"{path!r} was converted with another config than {config!r}; pass --config auto")
        own = named
    if own is None:
        raise ValueError(f"{path!r} is a bare state dict: name its config (one of {sorted(EDM_CONFIGS)}) or "
                         "convert it first (duodiff-fast convert)")
    return load_edm_state_dict(own, sd), own


def convert_edm_state_dict(src: str, dst: str, config: Optional[str] = None, stage_interval=None) -> Dict[str, Any]:
    """Check an exported EDM / multistage state dict and write the package's file; returns its config."""
    own, sd = read_edm_file(src)
    if config not in (None, "auto"):
        cfg = get_edm_config(config)
    elif own is not None:
        cfg = own
    else:
        cfg = infer_edm_config(sd, stage_interval)
    net = load_edm_state_dict(cfg, sd)
    save_edm_file(net, cfg, dst)
    return normalize_config(cfg)
