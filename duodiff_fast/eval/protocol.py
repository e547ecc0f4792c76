"""The FID protocol an ``eval`` table was made under, recorded in ``results.json`` and printed above it.

An FID cannot be reproduced without it: the number of samples and their seeds, the solver and its
steps, classifier-free guidance (scale and formula), EMA or raw weights, the checkpoint files
(sha256), the reference statistics (file, sha256, kind and image count), the Inception network and its
weights (sha256, or "random") and the execution backend.

Reference files read by ``eval`` (:func:`reference_info` names the kind):

* U-ViT's ``fid_stats_*.npz``: ``mu`` (D,), ``sigma`` (D, D).
* ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` uint8 images (N, H, W, C)
  plus the ``mu``/``sigma`` of their pool3 features; the stored statistics are used.
* An image ``.npz`` (``arr_0`` only) or an image folder: statistics computed with the run's Inception.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional

import numpy as np

__all__ = ["reference_info", "build_protocol", "format_protocol", "checkpoints_of", "CFG_FORMULA", "INCEPTION_NETWORK"]

CFG_FORMULA = "eps = cond + s * (cond - uncond), uncond with the null class (U-ViT; = uncond + (s+1)(cond - uncond))"
DIT_CFG_FORMULA = ("out[:, :3] = uncond + (1 + s) * (cond - uncond) on the first 3 channels, the rest from the "
                   "conditional half (DiT's forward_with_cfg with scale 1 + s)")
INCEPTION_NETWORK = "Inception-v3 pool3 (2048 features), torch-fidelity 'inception-v3-compat' (TF FID port)"


def reference_info(source: str) -> Dict[str, object]:
    """What the FID reference ``source`` is: path, kind, sha256 (files) and image count where known."""
    from .fid import file_sha256

    path = os.fspath(source)
    if os.path.isdir(path):
        from .fid import _folder_files

        return {"path": path, "kind": "image folder (statistics computed with this run's Inception)",
                "sha256": None, "images": len(_folder_files(path))}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference not found: {path}")
    info: Dict[str, object] = {"path": path, "sha256": file_sha256(path)}
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        n_images = int(data["arr_0"].shape[0]) if "arr_0" in files else None
    has_stats = {"mu", "sigma"} <= files
    if has_stats and n_images is not None:
        info["kind"] = "ADM reference batch (stored mu/sigma of its arr_0 images)"
    elif has_stats:
        info["kind"] = "statistics file (mu/sigma, U-ViT fid_stats layout)"
    else:
        info["kind"] = "image npz (arr_0; statistics computed with this run's Inception)"
    info["images"] = n_images
    return info


def _steps(args) -> object:
    from ..samplers.driver import DEFAULT_NUM_STEPS

    if args.steps is not None:
        return args.steps
    if args.solver not in DEFAULT_NUM_STEPS:  # e.g. EDM's heun: its own default (see eval.edm_sample)
        return "default"
    default = DEFAULT_NUM_STEPS[args.solver]
    return "full grid" if default is None else default


def _weights(args) -> str:
    """Which weights the samples came from: a checkpoint or run folder records it in its config.json."""
    if args.random_weights:
        return f"random (seed {args.seed}; no checkpoint)"
    path = getattr(args, "checkpoint", None)
    if path:
        from ..models.pretrained import read_pretrained_config, resolve_pretrained_folder

        folder = resolve_pretrained_folder(path)
        if folder is not None:
            kind = read_pretrained_config(folder).get("weights")
            return f"{kind or 'unrecorded'} (checkpoint folder {folder})"
    return "EMA (ema_state_dict of trainer checkpoints)" if args.use_ema else "raw (as stored)"


def _cfg_formula(args) -> str:
    if not args.cfg_scale:
        return "off (conditional model only)"
    from .edm_sample import is_edm_run
    from .sample_cmd import resolve_model_spec

    if is_edm_run(args):  # EDM's Heun runs refuse --cfg-scale (eval.edm_sample)
        return "off (EDM's Heun sampler)"
    dit = resolve_model_spec(args).arch == "dit"
    return DIT_CFG_FORMULA if dit else CFG_FORMULA


def build_protocol(args, device, inception_id: str, reference: Mapping[str, object],
                   checkpoints: Mapping[str, Mapping[str, Mapping[str, str]]],
                   solver_options: Mapping[str, object]) -> Dict[str, object]:
    """The protocol dict of one ``eval`` run.

    Args:
        args: the ``eval`` arguments. device: where it ran. inception_id: the extractor's weights id
        ("sha256:..." or "random-seed<k>"). reference: :func:`reference_info`'s dict (plus the count
        the statistics came from). checkpoints: per method, {role: {"path", "sha256"}}.
        solver_options: the solver options the samples were drawn with (order, method, eta...).
    """
    files: Dict[str, str] = {}
    for per_method in checkpoints.values():
        for c in per_method.values():
            files[c["path"]] = c["sha256"]
    weights = _weights(args)
    cfg = {"scale": args.cfg_scale, "formula": _cfg_formula(args)}
    inception = {"network": INCEPTION_NETWORK,
                 "weights": "random" if inception_id.startswith("random") else inception_id,
                 "weights_id": inception_id}
    return {
        "n_samples": args.n_samples,
        "seeds": f"sample i uses noise seed mix_seed({args.seed}, i) and label seed mix_seed({args.seed} + 2**64, i), "
                 f"i = 0..{args.n_samples - 1}",
        "base_seed": args.seed,
        "class_labels": args.class_labels or "random",
        "solver": args.solver, "steps": _steps(args), "solver_options": dict(solver_options),
        "cfg": cfg, "weights": weights,
        "checkpoints": [{"path": p, "sha256": h} for p, h in sorted(files.items())],
        "reference": dict(reference),
        "inception": inception,
        "backend": args.backend, "backend_choice": getattr(args, "backend_choice", None), "device": str(device),
        "denoised_estimate": {"clip_denoised": bool(getattr(args, "clip_denoised", False)),
                              "thresholding": bool(getattr(args, "thresholding", False))},
    }


def format_protocol(p: Mapping[str, object]) -> str:
    """The protocol as the lines printed above the table."""
    opts = ", ".join(f"{k}={v}" for k, v in p["solver_options"].items())
    ref = p["reference"]
    lines: List[str] = [
        "Protocol",
        f"  samples: {p['n_samples']} per method; seeds: {p['seeds']}; labels: {p['class_labels']}",
        f"  solver: {p['solver']}, {p['steps']} steps" + (f" ({opts})" if opts else ""),
        f"  CFG: scale {p['cfg']['scale']:g}; {p['cfg']['formula']}",
        f"  weights: {p['weights']}",
    ]
    if p["checkpoints"]:
        lines += [f"  checkpoint {c['path']}: sha256 {c['sha256']}" for c in p["checkpoints"]]
    else:
        lines.append("  checkpoints: none")
    count = ref.get("count")
    lines.append(f"  reference: {ref['path']} ({ref['kind']}; sha256 {ref.get('sha256') or '-'}"
                 + (f"; statistics of {count} images" if count else "") + ")")
    inc = p["inception"]
    lines.append(f"  Inception: {inc['network']}; weights {inc['weights']}")
    lines.append(f"  backend: {p['backend']} on {p['device']}")
    return "\n".join(lines)


def checkpoints_of(manifests: Mapping[str, Mapping[str, object]]) -> Dict[str, Optional[dict]]:
    """Per method, the checkpoint records of its sample manifest."""
    return {label: dict(m.get("checkpoints") or {}) for label, m in manifests.items()}
