"""Key layouts of the U-ViT checkpoints users already have, and their mapping onto this package.

Layouts recognised in a state dict (after wrapper prefixes are removed):

``dit``
    The official DiT key names (``pos_embed``, ``x_embedder.proj.*``, ``t_embedder.mlp.*``,
    ``y_embedder.embedding_table.weight``, ``blocks.{i}.*``, ``final_layer.*``): the published
    ``DiT-XL-2-256x256.pt`` files, the ``model``/``ema`` entries of DiT's ``train.py`` checkpoints and
    this package's :class:`~duodiff_fast.models.dit.DiT`.
``uvit``
    The official U-ViT key names (``pos_embed``, ``patch_embed.proj.*``, ``in_blocks.{i}.*``,
    ``mid_block.*``, ``out_blocks.{i}.*``, ``norm.*``, ``decoder_pred.*``, ``final_layer.*``, ...):
    the published U-ViT ``nnet*.pth`` files, the DuoDiff authors' plain U-ViT backbones (their
    ``UViT`` keeps the official module tree) and this package's :class:`~duodiff_fast.models.UViT`.
``duodiff-early-exit``
    The DuoDiff authors' AdaDiff re-implementation (their ``EarlyExitUViT``): the backbone under
    ``uvit.``; one output head *before* every transformer layer, ``in_blocks_heads.{i}.*``,
    ``mid_block_head.*``, ``out_blocks_heads.{i}.*`` (each ``norm``, ``decoder_pred``,
    ``final_layer``); one uncertainty probe per layer ``matrix.{k}.*``. The probe of their published
    configs (``mlp_probe_per_layer``) is ``matrix.{k}.classifier.0.{weight (1, D), bias (1,)}``:
    u = mean over all tokens of sigmoid(w . token + b).
``adadiff-official``
    The AdaDiff authors' model (Tangshengku/AdaDiff): official U-ViT keys plus
    ``lte_classifer.{j}.lte.{weight (p*p*C, D), bias (p*p*C,)}`` for j = 0 .. depth, one estimator
    *after* every transformer layer j; the exit after layer j goes through the backbone's own final
    layer. The estimator outputs a per-pixel certainty map sigmoid(W token + b) over the patch tokens,
    trained towards 1 - tanh|g - eps|; the model exits when its mean exceeds a threshold.
``adadiff``
    This package's :class:`~duodiff_fast.methods.adadiff.AdaDiffUViT`: ``backbone.*``, ``heads.{i}.*``,
    ``uems.{i}.*``.

Wrapper prefixes removed from every key when *all* keys carry them: ``module.``
(DistributedDataParallel, accelerate) and ``_orig_mod.`` (``torch.compile``).

Facts about the other projects' names and shapes come from reading their public repositories; no
code of theirs is used.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Mapping, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

UVIT = "uvit"
DIT = "dit"
DUODIFF_EARLY_EXIT = "duodiff-early-exit"
ADADIFF_OFFICIAL = "adadiff-official"
ADADIFF = "adadiff"
LAYOUTS = (UVIT, DIT, DUODIFF_EARLY_EXIT, ADADIFF_OFFICIAL, ADADIFF)

_PREFIXES = ("module.", "_orig_mod.")
_UVIT_ROOTS = {"pos_embed", "patch_embed", "time_embed", "label_emb", "in_blocks", "mid_block", "out_blocks",
               "norm", "decoder_pred", "final_layer"}
_DIT_ROOTS = {"pos_embed", "x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"}
_EE_HEAD_ROOTS = ("in_blocks_heads", "mid_block_head", "out_blocks_heads")
_HEAD_PARTS = ("norm", "decoder_pred", "final_layer")


class LayoutError(ValueError):
    """A state dict whose key layout is not one this package can map."""


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove ``module.`` / ``_orig_mod.`` prefixes that every key carries (repeatedly, any order)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return out


def summarize_keys(sd: Mapping[str, object], limit: int = 14) -> str:
    """'root (count), ...' of the first key components, for error messages."""
    roots = Counter(k.split(".")[0] for k in sd)
    parts = [f"{r} ({n})" if n > 1 else r for r, n in sorted(roots.items())]
    more = f" ... (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Which of :data:`LAYOUTS` the (prefix-stripped) state dict ``sd`` has; LayoutError if none."""
    roots = {k.split(".")[0] for k in sd}
    if "uvit" in roots and roots & set(_EE_HEAD_ROOTS):
        return DUODIFF_EARLY_EXIT
    if {"backbone", "heads", "uems"} <= roots:
        return ADADIFF
    if {"x_embedder", "t_embedder", "blocks", "final_layer"} <= roots and roots <= _DIT_ROOTS:
        return DIT
    if "patch_embed" in roots and "pos_embed" in roots:
        extra = roots - _UVIT_ROOTS
        if not extra:
            return UVIT
        if extra == {"lte_classifer"}:
            return ADADIFF_OFFICIAL
    if roots & {"in_blocks_classifiers", "mid_block_classifier", "out_blocks_classifiers"}:
        raise LayoutError(
            "this is the DuoDiff authors' early, pre-release early-exit layout (in_blocks_classifiers / "
            "mid_block_classifier / out_blocks_classifiers), which their own code only keeps for old files; "
            f"it is not supported. Keys found: {summarize_keys(sd)}")
    raise LayoutError(
        "unknown checkpoint layout: expected U-ViT keys (patch_embed.*, pos_embed, in_blocks.*, ...), DiT keys "
        "(x_embedder.*, t_embedder.*, y_embedder.*, blocks.*, final_layer.*, pos_embed), the "
        "DuoDiff authors' early-exit model (uvit.*, *_heads.*, matrix.*), AdaDiff's (U-ViT keys + "
        f"lte_classifer.*) or this package's AdaDiffUViT (backbone.*, heads.*, uems.*). Keys found: "
        f"{summarize_keys(sd)}")


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(sd: Mapping[str, torch.Tensor], root: str) -> List[str]:
    """Distinct second components of keys under ``root.`` in first-seen order."""
    seen: Dict[str, None] = {}
    for k in sd:
        parts = k.split(".")
        if parts[0] == root and len(parts) > 2:
            seen.setdefault(parts[1], None)
    return list(seen)


def uvit_num_layers(backbone: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """(in-blocks, transformer layers N = 2 * in-blocks + 1) of a U-ViT state dict."""
    n_in = len(_indices(backbone, "in_blocks"))
    return n_in, 2 * n_in + 1


def early_exit_probe_kind(sd: Mapping[str, torch.Tensor], num_layers: int) -> str:
    """The DuoDiff authors' probe type from the ``matrix.*`` keys: one of their classifier_type names."""
    names = _indices(sd, "matrix")
    if not names:
        raise LayoutError("the early-exit checkpoint has no uncertainty probes (no matrix.* keys)")
    if any("," in n for n in names):
        return "mlp_probe_per_layer_per_timestep"
    first = f"matrix.{names[0]}."
    leaves = {k[len(first):] for k in sd if k.startswith(first)}
    if "q" in leaves or any(l.startswith("weight_kv.") for l in leaves):
        return "attention_probe"
    if leaves == {"classifier.0.weight", "classifier.0.bias"}:
        if len(names) == num_layers and names == [str(i) for i in range(num_layers)]:
            return "mlp_probe_per_layer"
        if len(names) == 1000:
            return "mlp_probe_per_timestep"
    raise LayoutError(
        f"unrecognised probes in the early-exit checkpoint: {len(names)} matrix entries (model has "
        f"{num_layers} layers) with keys {sorted(leaves)[:6]}")


def map_duodiff_early_exit(sd: Mapping[str, torch.Tensor]) -> Tuple[StateDict, int]:
    """DuoDiff authors' ``EarlyExitUViT`` (``mlp_probe_per_layer``) -> AdaDiffUViT key names.

    Their head and probe k sit before transformer layer k (in-blocks, mid-block, out-blocks in
    execution order), as this package's ``heads.{k}`` / ``uems.{k}`` do. The probes map onto
    ``uems.{k}.probe.*`` of :class:`~duodiff_fast.methods.adadiff_checkpoints.TokenProbeUEM`.

    Returns (state dict with ``backbone.*``, ``heads.{k}.*``, ``uems.{k}.probe.*`` keys, N layers).
    """
    backbone = _sub(sd, "uvit.")
    n_in, n = uvit_num_layers(backbone)
    kind = early_exit_probe_kind(sd, n)
    if kind != "mlp_probe_per_layer":
        raise LayoutError(
            f"the early-exit checkpoint uses the DuoDiff authors' {kind!r} probes; only 'mlp_probe_per_layer' "
            "(the probe of their published configs) maps onto AdaDiffUViT")
    out: StateDict = {f"backbone.{k}": v for k, v in backbone.items()}
    sources = [f"in_blocks_heads.{i}." for i in range(n_in)] + ["mid_block_head."] + \
              [f"out_blocks_heads.{i}." for i in range(n_in)]
    for k, prefix in enumerate(sources):
        head = _sub(sd, prefix)
        if not head:
            raise LayoutError(f"the early-exit checkpoint lacks the head {prefix}* of layer {k} "
                              f"(its backbone has {n} layers); keys found: {summarize_keys(sd)}")
        out.update({f"heads.{k}.{leaf}": v for leaf, v in head.items()})
        probe = _sub(sd, f"matrix.{k}.classifier.0.")
        out.update({f"uems.{k}.probe.{leaf}": v for leaf, v in probe.items()})
    used = {"uvit", "matrix", *_EE_HEAD_ROOTS}
    extra = sorted({k for k in sd if k.split(".")[0] not in used})
    extra += sorted(k for k in sd if k.startswith(("in_blocks_heads.", "out_blocks_heads."))
                    and int(k.split(".")[1]) >= n_in)
    if extra:
        raise LayoutError(f"keys the early-exit layout does not explain: {extra[:8]}")
    return out, n


def map_adadiff_official(sd: Mapping[str, torch.Tensor]) -> Tuple[StateDict, int, List[str]]:
    """AdaDiff authors' U-ViT with ``lte_classifer`` -> AdaDiffUViT key names.

    Their estimator j sits *after* layer j and exits through the backbone's final layer; this
    package's exit point k sits before layer k, so estimator j becomes ``uems.{j+1}`` and head
    ``heads.{j+1}`` a copy of the backbone's final layer (norm, decoder_pred, final_layer). Exit
    point 0 (before layer 1) does not exist there: ``heads.0`` is a final-layer copy that never
    runs (``uems.0`` is a never-exiting module without parameters). The estimator after the last
    layer is dropped: exiting there equals the full network's output, which this package always
    takes when no earlier exit fires.

    Returns (state dict, N layers, notes on what was dropped).
    """
    backbone = {k: v for k, v in sd.items() if not k.startswith("lte_classifer.")}
    _, n = uvit_num_layers(backbone)
    ltes = _indices(sd, "lte_classifer")
    if ltes != [str(j) for j in range(n)]:
        raise LayoutError(f"AdaDiff checkpoint with {len(ltes)} lte_classifer entries for a {n}-layer backbone "
                          f"(expected 0..{n - 1})")
    out: StateDict = {f"backbone.{k}": v for k, v in backbone.items()}
    final = {f"{part}.{leaf}": v for part in _HEAD_PARTS
             for leaf, v in _sub(backbone, f"{part}.").items()}
    for k in range(n):
        out.update({f"heads.{k}.{leaf}": v.clone() for leaf, v in final.items()})
    for j in range(n - 1):
        out.update({f"uems.{j + 1}.lte.{leaf}": v for leaf, v in _sub(sd, f"lte_classifer.{j}.lte.").items()})
    notes = [f"lte_classifer.{n - 1} (the estimator after the last layer) is not used: exiting there is the "
             "full network's output"]
    return out, n, notes

