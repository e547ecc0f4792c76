"""Load the early-exit checkpoints users already have into :class:`~.adadiff.AdaDiffUViT`.

Two published layouts (see :mod:`duodiff_fast.models.layouts` for their key names):

* the DuoDiff authors' AdaDiff (``EarlyExitUViT`` with ``mlp_probe_per_layer`` probes): the heads
  and the backbone map one to one; their probe, u = mean over all tokens (label and time tokens
  included) of sigmoid(w . token + b), becomes :class:`TokenProbeUEM`. Their sampler exits a sample
  at the first layer with u <= theta, the rule of :class:`~.adadiff.AdaDiff`, so exits agree.
* AdaDiff's own (Tangshengku/AdaDiff ``lte_classifer``): the estimator after layer j becomes
  :class:`PixelCertaintyUEM` before layer j + 1, u = 1 - mean certainty, with every head a copy of
  the backbone's final layer, and a :class:`NoExitUEM` before layer 0. Their threshold ``thres``
  (exit when the mean certainty exceeds it) corresponds to theta = 1 - thres. Their sampler decides
  per *batch* (the mean over all samples) and waits for a second firing among the in-blocks; here
  every sample decides for itself at the first firing (the per-sample AdaDiff of the DuoDiff paper),
  so exits follow the same estimator but not that batch rule.

The replacement UEMs are not single linear layers (``is_linear`` is False): both exit paths of
AdaDiffUViT call them as ``uem(tokens, temb) -> u (B,)``.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from ..models import layouts
from ..models.checkpoint import (
    CheckpointError, declared_time_input, extract_state_dict, infer_config, key_mismatch_lines, load_checkpoint_object,
)
from ..models.uvit import UViT
from .adadiff import AdaDiffUViT

__all__ = ["TokenProbeUEM", "PixelCertaintyUEM", "NoExitUEM", "load_adadiff"]


class TokenProbeUEM(nn.Module):
    """The DuoDiff authors' per-layer probe: u = mean over all N tokens of sigmoid(w . token + b).

    tokens (B, N, D), temb (unused) -> u (B,). Parameters ``probe.weight`` (1, D), ``probe.bias`` (1,).
    """

    is_linear = False

    def __init__(self, embed_dim: int):
        super().__init__()
        self.probe = nn.Linear(embed_dim, 1)

    def forward(self, tokens: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.sigmoid(self.probe(tokens)).squeeze(-1).mean(dim=1)


class PixelCertaintyUEM(nn.Module):
    """AdaDiff's estimator as an uncertainty: u = 1 - mean of sigmoid(W token + b) over the patch tokens.

    tokens (B, extras + L, D) -> u (B,). ``lte.weight`` (p*p*C, D), ``lte.bias`` (p*p*C,): the mean
    over the unpatchified per-pixel certainty map equals the mean over (L, p*p*C), since unpatchify
    only reorders entries. Computed in float32, as the original casts tokens to float.
    """

    is_linear = False

    def __init__(self, embed_dim: int, patch_dim: int, extras: int):
        super().__init__()
        self.extras = extras
        self.lte = nn.Linear(embed_dim, patch_dim)

    def forward(self, tokens: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = tokens[:, self.extras:, :].float()
        w, b = self.lte.weight.float(), self.lte.bias.float()
        certainty = torch.sigmoid(nn.functional.linear(x, w, b)).flatten(1).mean(dim=1)
        return (1.0 - certainty).to(tokens.dtype)


class NoExitUEM(nn.Module):
    """An exit point the source model does not have: u = +inf, above every theta in [0, 1].

    For inference only: AdaDiffObjective on a model holding one gives an infinite L_u.
    """

    is_linear = False

    def forward(self, tokens: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.full((tokens.shape[0],), float("inf"), dtype=tokens.dtype, device=tokens.device)


def load_adadiff(checkpoint: Union[str, os.PathLike, Mapping[str, object]], num_heads: Optional[int] = None,
                 use_ema: bool = False) -> AdaDiffUViT:
    """Build an :class:`AdaDiffUViT` from an early-exit checkpoint and load it strictly.

    Accepts the DuoDiff authors' early-exit files (their trainer's dict with ``model_state_dict`` and
    ``args``, or a bare state dict), AdaDiff's (``nnet.pth`` / ``nnet_ema.pth``: U-ViT keys plus
    ``lte_classifer.*``, or their ``<step>.ckpt/`` folder: ``use_ema`` picks ``nnet_ema.pth``) and
    this package's AdaDiffUViT state dicts (single-layer UEMs). The backbone
    architecture is inferred from the weights; ``num_heads`` (not visible in weights) comes from
    the argument, the authors' ``args``, or a registered config of the same width. A declared time
    input is recorded as ``model.time_input`` (see :mod:`duodiff_fast.models.checkpoint`).
    """
    obj, use_ema, where = load_checkpoint_object(checkpoint, use_ema)
    sd = extract_state_dict(obj, use_ema=use_ema)
    try:
        layout = layouts.detect_layout(sd)
    except layouts.LayoutError as e:
        raise CheckpointError(f"{where}: {e}") from None
    args = obj.get("args") if isinstance(obj.get("args"), Mapping) else {}
    heads = num_heads or args.get("num_heads")
    try:
        if layout == layouts.DUODIFF_EARLY_EXIT:
            mapped, n = layouts.map_duodiff_early_exit(sd)
        elif layout == layouts.ADADIFF_OFFICIAL:
            mapped, n, _ = layouts.map_adadiff_official(sd)
        elif layout == layouts.ADADIFF:
            mapped, n = sd, None
        else:
            raise CheckpointError(
                f"{where} holds a plain U-ViT ({layout}) without exit heads or uncertainty modules: load it "
                "with duodiff_fast.models.load_model and wrap it in AdaDiffUViT to train the heads")
    except layouts.LayoutError as e:
        raise CheckpointError(f"{where}: {e}") from None
    backbone_sd = {k[len("backbone."):]: v for k, v in mapped.items() if k.startswith("backbone.")}
    backbone = UViT(**infer_config(backbone_sd, num_heads=heads))
    hidden = 0
    if layout == layouts.ADADIFF and "uems.0.mlp.2.weight" in mapped:
        hidden = int(mapped["uems.0.mlp.0.weight"].shape[0])
    model = AdaDiffUViT(backbone, uem_hidden=hidden)
    d, extras = backbone.embed_dim, backbone.extras
    if layout == layouts.DUODIFF_EARLY_EXIT:
        model.uems = nn.ModuleList([TokenProbeUEM(d) for _ in range(n)])
    elif layout == layouts.ADADIFF_OFFICIAL:
        patch_dim = backbone.patch_size ** 2 * backbone.in_chans
        model.uems = nn.ModuleList([NoExitUEM()] + [PixelCertaintyUEM(d, patch_dim, extras) for _ in range(n - 1)])
    lines = key_mismatch_lines(model, mapped, what=f"{where} (layout {layout}, mapped onto AdaDiffUViT)")
    if lines:
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(mapped, strict=True)
    model.time_input = declared_time_input(obj, where)
    return model
