"""``--backend auto``: the fastest execution backend that runs here and computes the right function.

    choice = choose_backend("cifar10-s2", torch.device("cuda"))
    choice.backend   # "triton"
    choice.reason    # "auto: triton passed self-check on NVIDIA H100 80GB HBM3 (sm_90) ..."

Candidates, fastest first (:data:`AUTO_ORDER`): ``triton``, ``torch.compile``, ``eager-bf16``,
``reference``. On a CPU auto is ``reference`` (the reduced-precision backends are GPU backends; the
Triton kernels run on the CPU only in Triton's slow interpreter).

A candidate is taken when (a) it is available on the device (:func:`backend_unavailable_reasons`
lists *every* reason it is not) and (b) it passes a self-check the first time it is used there: a
forward of a small model of the config, U-ViT or DiT (its widths, heads, patch and image size; at most
:data:`CHECK_DEPTH` layers, random weights from a fixed seed; a DiT's at unit scale, off adaLN-Zero) on a small batch of fresh random
inputs, compared with the float32 reference; the relative RMS error must stay under
:data:`TOLERANCE` for the backend's dtype. A candidate that fails the check, or cannot compile,
is skipped with one warning naming the failure and the next is tried (``reference`` needs no check).
When ``duodiff_fast._C`` cannot serve the device (not built, or built without CUDA kernels) the
reason says so: the sampler's native ops then run in PyTorch whatever the backend.

The outcome is cached per (device name, compute capability, torch, triton and package version,
self-check version :data:`CHECK_VERSION`, config) in ``backend-choice.json`` of the user cache folder (:func:`cache_dir`), written atomically,
so the check runs once per machine and installation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["AUTO_ORDER", "TOLERANCE", "CHECK_DEPTH", "BackendChoice", "backend_unavailable_reasons", "cache_dir",
           "cache_key", "choose_backend", "self_check"]

AUTO_ORDER = ("triton", "torch.compile", "eager-bf16", "reference")

# Relative RMS error against the float32 reference that a backend's dtype allows. bfloat16 keeps 8
# mantissa bits (unit roundoff 3.9e-3); a forward of a few layers stays well under 3e-2, a wrong
# kernel is off by O(1). float32 paths differ from the reference only by summation order.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECK_DEPTH = 4
CHECK_BATCH = 2
CACHE_FILE = "backend-choice.json"
# Part of the cache key: bumped when what the self-check checks changes (2: DiT configs are checked
# at unit scale (off adaLN-Zero), and the triton backend runs DiT), so choices cached by an
# older check are made again.
CHECK_VERSION = 2


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """The backend ``auto`` resolved to, and why (recorded in manifests and benchmark JSON)."""

    backend: str
    reason: str
    cached: bool = False


def cache_dir() -> str:
    """``$DUODIFF_FAST_CACHE``, else ``$XDG_CACHE_HOME/duodiff-fast``, else ``~/.cache/duodiff-fast``."""
    explicit = os.environ.get("DUODIFF_FAST_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "duodiff-fast")


# ------------------------------------------------------------------------------ availability
def backend_unavailable_reasons(backend: str, device) -> List[str]:
    """Every reason ``backend`` cannot run on ``device`` (empty when it can)."""
    from .backends import check_backend
    from .ops import availability
    from .ops.availability import triton_import_error

    check_backend(backend)
    device = torch.device(device)
    reasons: List[str] = []
    if backend == "reference":
        return reasons
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device is available"]
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None
    if backend == "eager-bf16":
        if device.type == "cuda" and major < 8:
            reasons.append(f"compute capability {major}.x has no native bfloat16 (8.0 or newer needed)")
        return reasons
    if backend == "torch.compile":
        if device.type == "cuda":
            err = triton_import_error()
            if err:
                reasons.append(f"torch.compile's CUDA code generator needs triton: {err}")
            if major < 7:
                reasons.append(f"compute capability {major}.x: torch.compile's Triton code needs 7.0 or newer")
        return reasons
    return availability.triton_unavailable_reasons(device)  # triton: every reason, from the one place


# ------------------------------------------------------------------------------ cache
def _versions() -> Dict[str, str]:
    from .version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: part of the key, not an error
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "duodiff_fast": __version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device.type


def cache_key(device, config: str) -> str:
    """``NVIDIA H100 ... (sm_90)|torch 2.11.0|triton 3.6.0|duodiff_fast 0.1.0|check 2|cifar10-s2``."""
    device = torch.device(device)
    v = _versions()
    return "|".join([_device_name(device), f"torch {v['torch']}", f"triton {v['triton']}",
                     f"duodiff_fast {v['duodiff_fast']}", f"check {CHECK_VERSION}", config_label(config)])


def config_label(config) -> str:
    """A config as the cache key and messages name it: a registered name or path as given, a
    :class:`~duodiff_fast.models.ModelSpec` (e.g. read from a checkpoint folder) by its full JSON."""
    if isinstance(config, str):
        return config
    import json

    return json.dumps(config.to_dict(), sort_keys=True)


def _read_cache(path: str) -> Dict[str, dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache is rebuilt, and said so
        warnings.warn(f"ignoring the unreadable backend cache {path} ({e}); the self-check runs again",
                      RuntimeWarning, stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: str, key: str, entry: dict) -> None:
    from .io_utils import atomic_write_json

    data = _read_cache(path)
    data[key] = entry
    atomic_write_json(path, data)


# ------------------------------------------------------------------------------ self-check
def _check_model(config: str, device: torch.device) -> torch.nn.Module:
    """A small model of ``config`` (U-ViT or DiT; at most CHECK_DEPTH layers, seeded weights)."""
    from .models import create_model, get_config

    depth = min(int(get_config(config)["depth"]), CHECK_DEPTH)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = create_model(config, depth=depth)
        if hasattr(model, "t_embedder"):
            _unit_scale_dit(model)
    return model.to(device).eval()


def _unit_scale_dit(model: torch.nn.Module) -> None:
    """Redraw a DiT's weight matrices at unit scale, in place.

    A fresh DiT is adaLN-Zero (modulation and output layers zero: it outputs zeros whatever its
    blocks compute), and even off zero its N(0, 0.02) label and time embeddings make c, hence every
    gate, so small that a wrong block would change the output by less than the bfloat16 tolerance.
    With every weight matrix N(0, 1/fan_in) and the label table N(0, 1), c and the gates are O(1):
    on DiT-XL/2 leaving out the last of 4 blocks changes the output by ~40%.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.requires_grad:  # not the fixed sin-cos pos_embed
                p.normal_(0.0, 1.0 if "embedding_table" in name else p[0].numel() ** -0.5)


def _check_inputs(model, device: torch.device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(CHECK_BATCH, model.in_chans, model.img_size, model.img_size, generator=g)
    t = torch.randint(1, 1000, (CHECK_BATCH,), generator=g).double()
    y = torch.randint(0, max(1, model.num_classes - 1), (CHECK_BATCH,), generator=g) if model.is_conditional else None
    return x.to(device), t.to(device), None if y is None else y.to(device)


def self_check(backend: str, config: str, device) -> float:
    """Relative RMS error of ``backend`` against the float32 reference on a small model of ``config``.

    Raises:
        AssertionError: the error is above the dtype's :data:`TOLERANCE` (the message says by how much).
        Exception: whatever preparing or running the backend raised (e.g. a compile error).
    """
    from .backends import model_dtype, prepare_model

    device = torch.device(device)
    model = _check_model(config, device)
    x, t, y = _check_inputs(model, device)
    with torch.no_grad():
        ref = prepare_model(model, "reference")(x, t, y).double()
        fast = prepare_model(model, backend)
        dtype = model_dtype(fast)
        out = fast(x.to(dtype), t, y).double()
    if out.shape != ref.shape:
        raise AssertionError(f"output shape {tuple(out.shape)}, the reference gives {tuple(ref.shape)}")
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(out).all() else float("inf")
    tol = TOLERANCE[dtype]
    if not err <= tol:
        raise AssertionError(f"relative error {err:.3g} against the float32 reference exceeds the "
                             f"{str(dtype).replace('torch.', '')} tolerance {tol:g}")
    return err


# ------------------------------------------------------------------------------ choosing
def choose_backend(config: str, device, candidates: Optional[Sequence[str]] = None,
                   use_cache: bool = True) -> BackendChoice:
    """The backend ``auto`` means for ``config`` on ``device`` (see the module docstring).

    Args:
        config: model config name (the self-check builds a small model of it).
        device: where sampling runs.
        candidates: backends to try, fastest first (default :data:`AUTO_ORDER` on CUDA, only
            ``reference`` elsewhere).
        use_cache: read and write the per-machine cache (:func:`cache_dir`).
    """
    from .devices import normalize_device

    device = normalize_device(device)
    if candidates is None:
        if device.type != "cuda":
            return BackendChoice("reference", f"auto: reference (on {device.type} auto runs the float32 "
                                              "reference; the faster backends need a CUDA GPU)")
        candidates = AUTO_ORDER
    return select_backend(device, cache_key(device, config), candidates, lambda name: self_check(name, config, device),
                          shown=getattr(config, "name", config), check_name="self-check", use_cache=use_cache,
                          note_native=True)


def select_backend(device: torch.device, key: str, candidates: Sequence[str], check: Callable[[str], float],
                   shown: str, check_name: str, use_cache: bool = True, note_native: bool = False) -> BackendChoice:
    """The first of ``candidates`` that is available on ``device`` and passes ``check(name)`` (its
    relative error; it raises on failure), with the reason; cached under ``key``. The one loop
    behind :func:`choose_backend` and the EDM U-Nets' ``choose_edm_backend``.

    A candidate that fails its check is skipped with one warning naming the failure; a
    RuntimeError lists every skipped candidate when none is left.
    """
    from .ops.availability import native_unavailable_reason

    path = os.path.join(cache_dir(), CACHE_FILE)
    key = key + "|" + ",".join(candidates)
    if use_cache:
        hit = _read_cache(path).get(key)
        if isinstance(hit, dict) and hit.get("backend") in candidates and hit.get("reason"):
            return BackendChoice(hit["backend"], f"{hit['reason']} (cached in {path})", cached=True)
    skipped: List[str] = []
    where = _device_name(device)
    for name in candidates:
        reasons = backend_unavailable_reasons(name, device)
        if reasons:
            skipped.append(f"{name} unavailable: {'; '.join(reasons)}")
            continue
        if name == "reference":
            reason = f"auto: reference on {where}"
        else:
            try:
                err = check(name)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is skipped, loudly, by design
                failure = f"{name} failed {check_name} on {where} ({type(exc).__name__}: {exc})"
                warnings.warn(f"duodiff_fast --backend auto: {failure}; trying the next backend",
                              RuntimeWarning, stacklevel=2)
                skipped.append(failure)
                continue
            reason = f"auto: {name} passed {check_name} on {where} (relative error {err:.2g} on {shown})"
        if skipped:
            reason += "; skipped: " + "; ".join(skipped)
        native_reason = native_unavailable_reason(device) if note_native else None
        if native_reason:  # every backend runs, but the sampler ops fall back to PyTorch: say so
            reason += f"; native ops in PyTorch: {native_reason}"
        if use_cache:
            _write_cache(path, key, {"backend": name, "reason": reason})
        return BackendChoice(name, reason)
    raise RuntimeError(f"--backend auto found no backend for {shown} on {where}: " + "; ".join(skipped))
