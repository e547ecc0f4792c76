"""EDM model configs as plain dicts, and the one function that builds a network from such a dict.

A config is a JSON-able dict: ``precond`` ('edm', 'vp' or 've'), ``model_type`` ('SongUNet' or
'MultistageUNet'), ``img_resolution``, ``img_channels``, ``label_dim`` and the U-Net's own
constructor arguments under their EDM names (the same keys as EDM's ``network_kwargs`` and as the
``kwargs`` entries of ../shared/golden/multistage_reference.pt). Precondition arguments
(``sigma_data`` ...) go under ``precond_kwargs``. A registry of model types can store these dicts
as they are (e.g. in a config.json).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

from .precond import PRECONDITIONINGS
from .unet import MultistageUNet, SongUNet

__all__ = ["EDM_CONFIGS", "MODEL_TYPES", "build_edm_net", "get_edm_config", "normalize_config"]

MODEL_TYPES = {"SongUNet": SongUNet, "MultistageUNet": MultistageUNet}

# EDM's train.py for CIFAR-10 32x32 DDPM++ (--arch=ddpmpp; augment_dim 9 with its default --augment)
# and the multistage authors' --arch=ddpmpp-multistage; tiny variants for tests and CPU smoke runs.
_DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], num_blocks=4, attn_resolutions=[16])
EDM_CONFIGS: Dict[str, Dict[str, Any]] = {
    "edm-cifar10-ddpmpp": dict(precond="edm", model_type="SongUNet", img_resolution=32, img_channels=3,
                               label_dim=0, model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
                               dropout=0.13, **_DDPMPP),
    "multistage-cifar10-ddpmpp": dict(precond="edm", model_type="MultistageUNet", img_resolution=32,
                                      img_channels=3, label_dim=0, en_model_channels=128,
                                      de_model_channels=[192, 128, 16], stage_num=3,
                                      stage_interval=[[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]],
                                      channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, **_DDPMPP),
    "edm-tiny-ddpmpp": dict(precond="edm", model_type="SongUNet", img_resolution=8, img_channels=3, label_dim=0,
                            model_channels=16, channel_mult=[1, 2], dropout=0.0,
                            **{**_DDPMPP, "num_blocks": 1, "attn_resolutions": [4]}),
    "multistage-tiny-ddpmpp": dict(precond="edm", model_type="MultistageUNet", img_resolution=8, img_channels=3,
                                   label_dim=0, en_model_channels=16, de_model_channels=[24, 16, 8], stage_num=3,
                                   stage_interval=[[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]],
                                   channel_mult=[1, 2], dropout=0.0,
                                   **{**_DDPMPP, "num_blocks": 1, "attn_resolutions": [4]}),
}


def get_edm_config(name: str) -> Dict[str, Any]:
    """A deep copy of a named config; KeyError lists the names."""
    if name not in EDM_CONFIGS:
        raise KeyError(f"unknown EDM config {name!r}; known: {sorted(EDM_CONFIGS)}")
    return copy.deepcopy(EDM_CONFIGS[name])


def normalize_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Check the required keys and types; returns a copy with defaults filled (precond 'edm', label_dim 0)."""
    if not isinstance(config, dict):
        raise TypeError(f"an EDM model config is a dict, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    cfg.setdefault("precond", "edm")
    cfg.setdefault("label_dim", 0)
    for key in ("model_type", "img_resolution", "img_channels"):
        if key not in cfg:
            raise ValueError(f"EDM model config lacks {key!r}: {sorted(cfg)}")
    if cfg["precond"] not in PRECONDITIONINGS:
        raise ValueError(f"precond must be one of {sorted(PRECONDITIONINGS)}, got {cfg['precond']!r}")
    if cfg["model_type"] not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {cfg['model_type']!r}")
    return cfg


def build_edm_net(config: Dict[str, Any]):
    """Build the preconditioned network a config describes (weights freshly initialized)."""
    cfg = normalize_config(config)
    precond = PRECONDITIONINGS[cfg.pop("precond")]
    unet = MODEL_TYPES[cfg.pop("model_type")]
    res, ch, label_dim = cfg.pop("img_resolution"), cfg.pop("img_channels"), cfg.pop("label_dim")
    precond_kwargs = cfg.pop("precond_kwargs", {}) or {}
    out_ch = ch
    model = unet(res, ch, out_ch, label_dim=label_dim, **cfg)
    return precond(model, res, ch, label_dim, **precond_kwargs)
