"""Checkpoint folders that know their config (the Hugging Face layout, written offline by hand).

A *pretrained folder* holds two files:

    config.json          the JSON model config (see :mod:`.configs`: ``model_type``, ``model``
                         keywords, ``schedule``, ``time_input``, ``latent``) plus what the folder
                         records about its weights: ``format`` (:data:`PRETRAINED_FORMAT`),
                         ``weights`` ("ema" or "raw" for the trainer's exports), ``step``,
                         ``ema`` ({"decay", "warmup", "num_updates"}) and ``train`` (run settings)
    model.safetensors    the state dict (the model's own key names), with the time input in its
                         metadata

A *run folder* (``TrainConfig.out_dir``) holds, besides ``latest.pt`` / ``ckpt_*.pt``, the
exports ``export/ema/`` and ``export/raw/`` (pretrained folders, rewritten at every checkpoint).
Given a run folder, :func:`resolve_pretrained_folder` picks ``export/ema`` (the EMA weights);
pass ``RUN/export/raw`` for the raw weights.

    save_pretrained(model, "out/my_model", spec)      # spec: a ModelSpec, name or JSON path
    model = load_pretrained("out/my_model")           # built from config.json, loaded strictly

Other architectures become loadable by registering a model type (:mod:`.model_types`) and
saving with a spec naming it.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from .configs import ModelSpec, SpecLike, get_spec
from .model_types import get_model_type

PathLike = Union[str, "os.PathLike[str]"]
PRETRAINED_FORMAT = "duodiff_fast.pretrained/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_DIR = "export"
EXPORT_KINDS = ("ema", "raw")
DEFAULT_RUN_WEIGHTS = "ema"


def is_pretrained_folder(path: PathLike) -> bool:
    """True when ``path`` is a folder holding ``config.json`` and ``model.safetensors``."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def is_run_folder(path: PathLike) -> bool:
    """True when ``path`` is a training run folder with exports (``export/ema`` or ``export/raw``)."""
    return any(is_pretrained_folder(os.path.join(os.fspath(path), EXPORT_DIR, k)) for k in EXPORT_KINDS)


def export_folder(run_dir: PathLike, kind: str = DEFAULT_RUN_WEIGHTS) -> str:
    """``run_dir/export/<kind>`` (kind "ema" or "raw")."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind must be one of {EXPORT_KINDS}, got {kind!r}")
    return os.path.join(os.fspath(run_dir), EXPORT_DIR, kind)


def resolve_pretrained_folder(path: PathLike) -> Optional[str]:
    """The pretrained folder ``path`` stands for: itself, a run folder's ``export/ema`` (the
    default weights of a run), or None when ``path`` is neither (a file, or another folder)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if is_pretrained_folder(path):
        return path
    ema = export_folder(path, "ema")
    if is_pretrained_folder(ema):
        return ema
    if is_pretrained_folder(export_folder(path, "raw")):
        raise FileNotFoundError(f"run folder {path} has export/raw but no export/ema; pass {export_folder(path, 'raw')}")
    return None


def read_pretrained_config(folder: PathLike) -> Dict[str, Any]:
    """The raw ``config.json`` dict of a pretrained folder."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def pretrained_spec(folder: PathLike) -> ModelSpec:
    """The :class:`ModelSpec` a pretrained folder records."""
    from .configs import load_spec_file

    return load_spec_file(os.path.join(os.fspath(folder), CONFIG_FILE))


def _model_spec(model: torch.nn.Module, spec: Optional[SpecLike]) -> ModelSpec:
    """``spec`` checked against ``model.config``, or a spec made from ``model.config``."""
    config = getattr(model, "config", None)
    if spec is not None:
        spec = get_spec(spec)
        if isinstance(config, dict):
            differ = sorted(k for k in set(config) | set(spec.kwargs)
                            if k != "use_checkpoint" and config.get(k) != spec.kwargs.get(k))
            if differ:
                raise ValueError(f"the model does not match spec {spec.name!r} on {differ}")
        return spec
    if not isinstance(config, dict):
        raise ValueError("the model has no plain-data .config: pass spec= (a ModelSpec, name or JSON path)")
    from .uvit import UViT

    if not isinstance(model, UViT):
        raise ValueError(f"{type(model).__name__}: pass spec= naming its registered model_type")
    return ModelSpec("custom", {k: v for k, v in config.items() if k != "use_checkpoint"}, "linear",
                     source="saved from a UViT", time_input=getattr(model, "time_input", None) or "index")


def save_pretrained(model: torch.nn.Module, folder: PathLike, spec: Optional[SpecLike] = None,
                    extra: Optional[Mapping[str, Any]] = None, time_input: Optional[str] = None) -> str:
    """Write ``model`` as a pretrained folder (``config.json`` + ``model.safetensors``); returns it.

    Args:
        model: the network; its ``.config`` must agree with ``spec`` (checked).
        folder: the folder to (re)write. Both files are written into a sibling temporary folder
            that then replaces ``folder``, so a reader never sees weights of one save with the
            config of another.
        spec: the model config (default: made from ``model.config``, U-ViT only).
        extra: more :data:`~.configs.FOLDER_KEYS` entries (``weights``, ``step``, ``ema``, ``train``).
        time_input: the network's time input (default ``model.time_input``, else the spec's).
    """
    from safetensors.torch import save

    from ..io_utils import atomic_write_bytes, atomic_write_json
    from .configs import FOLDER_KEYS, check_time_input

    spec = _model_spec(model, spec)
    time_input = check_time_input(time_input or getattr(model, "time_input", None) or spec.time_input)
    extra = dict(extra or {})
    bad = sorted(set(extra) - set(FOLDER_KEYS) - {"format"})
    if bad:
        raise ValueError(f"save_pretrained: unknown extra key(s) {bad}; allowed: {sorted(FOLDER_KEYS)}")
    config = dict(spec.to_dict(), time_input=time_input, format=PRETRAINED_FORMAT, **extra)
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.{os.getpid()}.tmp")
    old = os.path.join(parent, f".{os.path.basename(folder)}.{os.getpid()}.old")
    for stale in (tmp, old):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    os.makedirs(tmp)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(os.path.join(tmp, WEIGHTS_FILE),
                       save(sd, metadata={"format": PRETRAINED_FORMAT, "time_input": time_input}))
    atomic_write_json(os.path.join(tmp, CONFIG_FILE), config)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    if os.path.exists(old):
        shutil.rmtree(old)
    return folder


def load_pretrained(path: PathLike, config: Optional[SpecLike] = None, device: Union[str, torch.device] = "cpu"
                    ) -> torch.nn.Module:
    """Build the network a pretrained folder (or a run folder: its ``export/ema``) records and
    load its weights strictly.

    ``config``: optional; when given it must agree with the recorded config (a mismatch, e.g. a
    different head count, is a ValueError naming the keys). The model gets ``.time_input`` and
    ``.spec`` (the recorded :class:`ModelSpec`).
    """
    folder = resolve_pretrained_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{os.fspath(path)} is not a checkpoint folder (config.json + model.safetensors) "
                                f"nor a run folder with {EXPORT_DIR}/ema")
    spec, state_dict, time_input = read_pretrained(folder)
    if config is not None:
        check_same_config(get_spec(config), spec, folder)
    model = get_model_type(spec.model_type).build(dict(spec.kwargs))
    from .checkpoint import CheckpointError, key_mismatch_lines

    lines = key_mismatch_lines(model, state_dict, what=f"checkpoint folder {folder}")
    if lines:
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    model.time_input = time_input
    model.spec = spec
    return model.to(device)


def read_pretrained(folder: PathLike) -> Tuple[ModelSpec, Dict[str, torch.Tensor], str]:
    """(recorded spec, state dict, time input) of a pretrained folder."""
    from safetensors.torch import load_file

    spec = pretrained_spec(folder)
    path = os.path.join(os.fspath(folder), WEIGHTS_FILE)
    try:
        state_dict = load_file(path, device="cpu")
    except Exception as e:
        from .checkpoint import CheckpointError

        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return spec, state_dict, spec.time_input


def check_same_config(given: ModelSpec, recorded: ModelSpec, where: str) -> None:
    """ValueError naming the keywords where a given config and a checkpoint's recorded one differ."""
    if given.model_type != recorded.model_type:
        raise ValueError(f"{where} records model_type {recorded.model_type!r}, but the config given is "
                         f"{given.model_type!r}")
    keys = (set(given.kwargs) | set(recorded.kwargs)) - {"use_checkpoint"}
    differ = sorted(k for k in keys if given.kwargs.get(k) != recorded.kwargs.get(k))
    if differ:
        detail = ", ".join(f"{k}: given {given.kwargs.get(k)!r} vs recorded {recorded.kwargs.get(k)!r}" for k in differ)
        raise ValueError(f"{where} records a different model config than {given.name!r} ({detail}); "
                         "drop --config (the checkpoint's own config is used) or give the matching one")
