"""``--backend auto`` for EDM's U-Nets: the fastest U-Net backend that runs here and computes the right function.

    choice = choose_edm_backend(get_edm_config("edm-cifar10-ddpmpp"), torch.device("cuda"))
    choice.backend   # "torch.compile"
    choice.reason    # "auto: torch.compile passed the EDM U-Net self-check on NVIDIA H100 ... "

The machinery is :mod:`duodiff_fast.auto_backend`'s (availability reasons, dtype tolerances, the
per-machine cache file and its key); what differs is the candidate list and the check model.
Candidates, fastest first (:data:`EDM_AUTO_ORDER`): ``torch.compile``, ``eager-bf16``,
``reference`` -- never ``triton`` (its kernels are the transformer's; a U-Net has none of those
layers). On a CPU auto is ``reference`` without a check.

The self-check (:func:`edm_self_check`) builds a small net of the config -- its preconditioning,
U-Net type, image size, channel multipliers, attention resolutions, labels and stage intervals,
but one block per level and at most :data:`CHECK_CHANNELS` channels (a multistage net's decoder
widths scaled alike), random weights from a fixed seed (every weight drawn, so the output is not
the near-zero of EDM's initialisation) -- and compares D(x; sigma) of the backend with the float32
reference on a batch of :data:`~duodiff_fast.auto_backend.CHECK_BATCH` fresh inputs, at noise levels
covering every stage of a multistage net (each decoder is checked). The relative RMS error must stay
under :data:`~duodiff_fast.auto_backend.TOLERANCE` of the backend's dtype.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import auto_backend as ab

__all__ = ["EDM_AUTO_ORDER", "CHECK_CHANNELS", "edm_check_config", "edm_self_check", "choose_edm_backend",
           "edm_config_label"]

EDM_AUTO_ORDER = ("torch.compile", "eager-bf16", "reference")
CHECK_CHANNELS = 32


def _narrow(c: int) -> int:
    """A smaller width: at most CHECK_CHANNELS, a multiple of 4 (EDM's GroupNorm takes C // 4 groups)."""
    return max(8, min(CHECK_CHANNELS, int(c)) // 4 * 4)


def edm_check_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The self-check's small net of ``config``: one block per level, narrower channels, no dropout."""
    from .configs import normalize_config

    cfg = normalize_config(config)
    small = copy.deepcopy(cfg)
    small["num_blocks"] = 1
    small["dropout"] = 0.0
    if cfg["model_type"] == "MultistageUNet":
        en = int(cfg.get("en_model_channels", 128))
        small["en_model_channels"] = _narrow(en)
        scale = small["en_model_channels"] / en
        small["de_model_channels"] = [_narrow(max(4, round(c * scale))) for c in cfg.get("de_model_channels", (192, 128, 16))]
    else:
        small["model_channels"] = _narrow(cfg.get("model_channels", 128))
    return small


def edm_config_label(config: Dict[str, Any], name: Optional[str] = None) -> str:
    """A config as the cache key names it: its registered name, else its JSON."""
    return name if name else json.dumps(config, sort_keys=True, default=str)


def _check_net(config: Dict[str, Any], device: torch.device):
    from .configs import build_edm_net

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = build_edm_net(edm_check_config(config))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every weight random: EDM zero-initialises the output layers
            for p in net.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))
    return net.to(device).eval()


def _check_sigmas(net) -> List[float]:
    """One noise level per stage of a multistage net (inside each stage's interval), else a few levels."""
    from .unet import MultistageUNet

    model = net.model
    if not isinstance(model, MultistageUNet):
        return [0.05, 1.0, 20.0]
    out = []
    for intervals in model.stage_interval:
        lo, hi = intervals[0]
        out.append(lo * 2 + 0.01 if hi == float("inf") else (lo + hi) / 2 if lo > 0 else hi / 2)
    return out


def edm_self_check(backend: str, config: Dict[str, Any], device) -> float:
    """Largest relative RMS error of ``backend`` against the float32 reference over the check's noise levels.

    Raises:
        AssertionError: an error above the dtype's tolerance (the message says which level and by how much).
        Exception: whatever preparing or running the backend raised (e.g. a compile error).
    """
    from .backends import prepare_edm_net

    device = torch.device(device)
    net = _check_net(config, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ab.CHECK_BATCH, net.img_channels, net.img_resolution, net.img_resolution, generator=g).to(device)
    labels = (torch.randint(0, net.label_dim, (ab.CHECK_BATCH,), generator=g).to(device) if net.label_dim else None)
    ref_net = prepare_edm_net(net, "reference")
    fast = prepare_edm_net(net, backend)
    dtype = fast.compute_dtype
    tol = ab.TOLERANCE[dtype]
    worst = 0.0
    with torch.no_grad():
        for s in _check_sigmas(net):
            sigma = torch.full((ab.CHECK_BATCH,), s, device=device)
            xs = x * (1 + s)  # noisy inputs of about the level's scale
            ref = ref_net(xs, sigma, labels).double()
            out = fast(xs, sigma, labels).double()
            if out.shape != ref.shape:
                raise AssertionError(f"output shape {tuple(out.shape)}, the reference gives {tuple(ref.shape)}")
            # D = c_skip x + c_out F: compare the network's part, which the skip would otherwise hide
            skip = ref_net.coefficients(sigma.reshape(-1, 1, 1, 1).float())[0]
            base = xs.double() * (skip.double() if torch.is_tensor(skip) else float(skip))
            err = (float((out - ref).norm() / (ref - base).norm().clamp_min(1e-30))
                   if torch.isfinite(out).all() else float("inf"))
            if not err <= tol:
                raise AssertionError(f"relative error {err:.3g} at sigma {s:g} against the float32 reference exceeds "
                                     f"the {str(dtype).replace('torch.', '')} tolerance {tol:g}")
            worst = max(worst, err)
    return worst


def choose_edm_backend(config: Dict[str, Any], device, candidates: Optional[Sequence[str]] = None,
                       use_cache: bool = True, name: Optional[str] = None) -> ab.BackendChoice:
    """The backend ``auto`` means for the EDM net ``config`` on ``device`` (see the module docstring).

    Args:
        config: the EDM model config (a dict, e.g. ``get_edm_config(name)`` or a converted file's).
        device: where sampling runs.
        candidates: backends to try, fastest first (default :data:`EDM_AUTO_ORDER` on CUDA, only
            ``reference`` elsewhere); ``triton`` is refused.
        use_cache: read and write the per-machine cache (``auto_backend.cache_dir()``).
        name: the config's registered name, for the cache key and messages (else its JSON).
    """
    from ..devices import normalize_device

    device = normalize_device(device)
    if candidates is None:
        if device.type != "cuda":
            return ab.BackendChoice("reference", f"auto: reference (on {device.type} auto runs the float32 "
                                                 "reference; the faster U-Net backends need a CUDA GPU)")
        candidates = EDM_AUTO_ORDER
    bad = [c for c in candidates if c not in EDM_AUTO_ORDER]
    if bad:
        raise ValueError(f"EDM U-Nets run on {', '.join(EDM_AUTO_ORDER)}; not {', '.join(bad)}")
    label = edm_config_label(config, name)
    return ab.select_backend(device, ab.cache_key(device, "edm:" + label), candidates,
                             lambda cand: edm_self_check(cand, config, device),
                             shown=name or config.get("model_type", "EDM net"), check_name="the EDM U-Net self-check",
                             use_cache=use_cache)
