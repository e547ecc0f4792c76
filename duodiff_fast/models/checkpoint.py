"""Safe checkpoint loading for U-ViT and DiT models.

Accepted files:
  * plain state dicts with the official key names (the published U-ViT ``nnet*.pth`` files);
  * dicts holding the weights under ``model_state_dict`` (the DuoDiff authors' trainer and this
    package's trainer), ``ema_state_dict``/``ema`` on request, or ``state_dict``;
  * ``.safetensors`` files;
  * the DuoDiff authors' training checkpoints (razvanmatisan/duodiff): ``step``,
    ``model_state_dict``, optimizer / GradScaler / LR-scheduler / data-sampler states, ``train_state``
    and ``args``, their ``argparse.Namespace`` of command-line settings;
  * files written by :func:`save_weights` that record the model's time input (below);
  * the official DiT files (``DiT-XL-2-256x256.pt``: a plain state dict) and DiT ``train.py``
    checkpoints (``model``, ``ema``, ``opt``, ``args``; ``use_ema`` picks ``ema``);
  * U-ViT / AdaDiff training-state folders (``<step>.ckpt/`` holding ``nnet.pth`` and
    ``nnet_ema.pth``; ``use_ema`` picks the latter);
  * checkpoint folders (``config.json`` + ``model.safetensors``, :mod:`.pretrained`) and this
    package's training run folders (their ``export/ema`` folder).

Model configs. Checkpoint folders, this package's training checkpoints and its exports record
the model's constructor keywords (``model_config``): :func:`load_model` builds from them, and
:func:`load_weights` refuses a model whose config differs (a head count changes no weight shape,
so the weights alone cannot catch it). For files that record nothing, :func:`infer_config` reads
the architecture from the shapes and takes the head count only from ``num_heads``, the DuoDiff
authors' ``args`` or a registered config the shapes fit exactly; otherwise it refuses.
Other projects' key layouts (the DuoDiff authors' and AdaDiff's early-exit models) are recognised
by :mod:`.layouts` and loaded by ``duodiff_fast.methods.adadiff_checkpoints.load_adadiff``.
Torch files are read with ``weights_only=True``: no pickled code runs. The one class allowed
besides tensors and plain containers is ``argparse.Namespace`` (a bag of attributes, needed for
the DuoDiff authors' ``args``); it is turned into a plain dict on load. ``module.`` (DDP) and
``_orig_mod.`` (torch.compile) prefixes are removed. Mismatches produce one error listing the
missing and unexpected keys and the shape mismatches, naming the registered configs the checkpoint
fits, and the checkpoint's layout when it is another model's (see :mod:`.layouts`).

Time input. What the network is fed at time t is a property of how it was trained, not of its
weights: ``"index"`` (the step index of a discrete schedule, t * 999 for the continuous one; the
official U-ViT and this package's default) or ``"normalized"`` (index / N: the DuoDiff authors'
CIFAR-10 and CelebA models, ``normalize_timesteps=True`` in their ``args``). A checkpoint
*declares* it when it says so (their ``args``; a ``time_input`` entry or safetensors metadata
written by :func:`save_weights`; this package's training checkpoints); :func:`load_weights` then
records it on the model as ``model.time_input`` and :func:`save_weights` writes it back, so a
re-saved model keeps it. Files that declare nothing (published U-ViT weights, plain state dicts)
take the model config's ``time_input`` (:class:`~duodiff_fast.models.configs.ModelSpec`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import zipfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .configs import TIME_INPUTS, check_time_input, matching_configs
from .layouts import LayoutError, detect_layout, strip_prefixes, summarize_keys

StateDict = Dict[str, torch.Tensor]

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
WEIGHTS_FORMAT = "duodiff_fast.weights/1"
# The only non-tensor class a torch checkpoint may hold (the DuoDiff authors' ``args``).
_SAFE_CLASSES = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def _torch_load_safe(path: str, mmap: bool):
    """``torch.load(weights_only=True)`` that also accepts ``argparse.Namespace`` (and nothing else)."""
    with torch.serialization.safe_globals(list(_SAFE_CLASSES)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (non-zip) files cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            raise


def _plain_namespaces(obj: Mapping[str, object]) -> Mapping[str, object]:
    """Top-level ``argparse.Namespace`` values (the DuoDiff authors' ``args``) as plain dicts."""
    if not any(isinstance(v, argparse.Namespace) for v in obj.values()):
        return obj
    return {k: dict(vars(v)) if isinstance(v, argparse.Namespace) else v for k, v in obj.items()}


def read_checkpoint_file(path: Union[str, os.PathLike], mmap: bool = False) -> Mapping[str, object]:
    """Read a checkpoint file safely (safetensors, or torch with ``weights_only=True``).

    ``mmap=True`` maps a torch file's tensors instead of reading them (for a cheap look at the
    other entries); a top-level ``argparse.Namespace`` comes back as a dict.
    """
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
        obj = _torch_load_safe(path, mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {e}") from e
    except Exception as e:  # weights_only refuses pickled objects with an UnpicklingError
        raise CheckpointError(
            f"{path} could not be loaded with weights_only=True (it holds objects other than "
            f"tensors, plain containers and argparse.Namespace, or is corrupt): {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return _plain_namespaces(obj)


def _safetensors_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def extract_state_dict(obj: Mapping[str, object], use_ema: bool = False) -> StateDict:
    """Find the model weights in a loaded checkpoint object; strip ``module.`` / ``_orig_mod.`` prefixes."""
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
    return strip_prefixes(obj)


# ------------------------------------------------------------------------------ what a file says
@dataclasses.dataclass
class CheckpointInfo:
    """What a checkpoint says about itself besides the weights.

    Attributes:
        layout: the weights' key layout (one of ``layouts.LAYOUTS``), or None when unrecognised.
        time_input: the declared time input ("index" / "normalized"), None when the file does not say.
        source: "duodiff-authors" (their trainer's file, with ``args``), "dit-train" (DiT's
            ``train.py``), "duodiff-fast-train", "duodiff-fast-weights", "safetensors" or "state-dict".
        args: the DuoDiff authors' ``args`` as a dict ({} otherwise).
        layout_error: why ``layout`` is None.
    """

    layout: Optional[str]
    time_input: Optional[str]
    source: str
    args: Dict[str, object] = dataclasses.field(default_factory=dict)
    layout_error: Optional[str] = None


# A U-ViT / AdaDiff training-state folder (``<step>.ckpt/``) keeps each part in its own file.
_TRAIN_STATE_FILES = {False: "nnet.pth", True: "nnet_ema.pth"}


def resolve_checkpoint_path(path: Union[str, os.PathLike], use_ema: bool = False) -> Tuple[str, bool]:
    """(file to read, whether the EMA weights still have to be picked inside it).

    A folder written by the U-ViT / AdaDiff trainers (``<step>.ckpt/`` with ``nnet.pth``,
    ``nnet_ema.pth``, ``optimizer.pth``, ``step.pth``) resolves to ``nnet_ema.pth`` when
    ``use_ema`` and ``nnet.pth`` otherwise; a checkpoint folder (``config.json`` +
    ``model.safetensors``, see :mod:`.pretrained`) to its ``model.safetensors``, a training run
    folder to ``export/ema/model.safetensors`` (its EMA weights); a file resolves to itself.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path, use_ema
    from .pretrained import WEIGHTS_FILE, resolve_pretrained_folder

    folder = resolve_pretrained_folder(path)  # a checkpoint folder, or a run folder's export/ema
    if folder is not None:
        return os.path.join(folder, WEIGHTS_FILE), False
    name = _TRAIN_STATE_FILES[bool(use_ema)]
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} is a folder without {name} (U-ViT/AdaDiff training-state folders hold nnet.pth and "
            f"nnet_ema.pth); it holds: {sorted(os.listdir(path))[:10]}")
    return file, False


def load_checkpoint_object(checkpoint: Union[str, os.PathLike, Mapping[str, object]],
                           use_ema: bool = False) -> Tuple[Mapping[str, object], bool, str]:
    """Read a checkpoint for loading: (object, ``use_ema`` left for :func:`extract_state_dict`, name).

    Paths (files or training-state folders, see :func:`resolve_checkpoint_path`) are read safely
    with :func:`read_checkpoint_file`; an already-loaded dict gets any top-level
    ``argparse.Namespace`` turned into a dict.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path, use_ema = resolve_checkpoint_path(checkpoint, use_ema)
        obj = read_checkpoint_file(path)
        if path.endswith(".safetensors"):  # what save_weights records travels as metadata
            meta = _safetensors_metadata(path)
            obj = {"state_dict": obj, **({"time_input": meta["time_input"]} if "time_input" in meta else {})}
            recorded = _recorded_config(path, meta)
            if recorded is not None:
                obj["model_config"], obj["model_type"] = recorded
        return obj, use_ema, path
    return _plain_namespaces(checkpoint), use_ema, "checkpoint"


def _recorded_config(path: str, meta: Mapping[str, str]) -> Optional[Tuple[Dict[str, object], str]]:
    """(constructor keywords, model_type) a safetensors file records: the ``config.json`` beside
    it in a checkpoint folder, or the ``model_config`` metadata :func:`save_weights` writes."""
    from .pretrained import CONFIG_FILE, WEIGHTS_FILE, pretrained_spec

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == WEIGHTS_FILE and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        spec = pretrained_spec(folder)
        return dict(spec.kwargs), spec.model_type
    if "model_config" in meta:
        try:
            config = json.loads(meta["model_config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: unreadable model_config metadata: {e}") from None
        return dict(config), meta.get("model_type", "uvit")
    return None


def recorded_model_config(obj: Mapping[str, object]) -> Optional[Dict[str, object]]:
    """The constructor keywords a loaded checkpoint object records (``model_config``: this
    package's training checkpoints, exports and checkpoint folders), or None."""
    config = obj.get("model_config")
    if isinstance(config, Mapping):
        return {k: v for k, v in config.items() if k != "use_checkpoint"}
    return None


def declared_time_input(obj: Mapping[str, object], where: str = "checkpoint") -> Optional[str]:
    """The time input a loaded checkpoint object declares ("index" / "normalized"), or None.

    Read from a ``time_input`` entry (this package's files) or the DuoDiff authors'
    ``args["normalize_timesteps"]``.
    """
    value = obj.get("time_input")
    if value is not None:
        if value not in TIME_INPUTS:
            raise CheckpointError(f"{where} declares time_input={value!r}; expected one of {TIME_INPUTS}")
        return str(value)
    args = obj.get("args")
    if isinstance(args, Mapping) and "normalize_timesteps" in args:
        # The DuoDiff authors' models divide the step index by 1000 when this flag is set, which
        # is index / N only for their default N = 1000 steps.
        if not bool(args["normalize_timesteps"]):
            return "index"
        steps = args.get("num_timesteps", 1000)
        if steps != 1000:
            raise CheckpointError(f"{where} was trained with normalize_timesteps and num_timesteps={steps}: its "
                                  "network input index / 1000 is not a time input this package can express")
        return "normalized"
    return None


def checkpoint_info(checkpoint: Union[str, os.PathLike, Mapping[str, object]], use_ema: bool = False) -> CheckpointInfo:
    """Describe a checkpoint (path or loaded dict) without loading it into a model.

    Torch files are memory-mapped, so this is cheap even for large checkpoints.
    """
    where = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint, use_ema = resolve_checkpoint_path(checkpoint, use_ema)
        where = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)) and where.endswith(".safetensors"):
        obj, use_ema, _ = load_checkpoint_object(where, use_ema)
        source = "safetensors"
    else:
        is_path = isinstance(checkpoint, (str, os.PathLike))
        obj = read_checkpoint_file(checkpoint, mmap=True) if is_path else _plain_namespaces(checkpoint)
        if isinstance(obj.get("args"), Mapping) and _dit_heads_from_args(obj["args"]) is not None:
            source = "dit-train"
        elif isinstance(obj.get("args"), Mapping):
            source = "duodiff-authors"
        elif str(obj.get("format", "")).startswith("duodiff_fast.train"):
            source = "duodiff-fast-train"
        elif obj.get("format") == WEIGHTS_FORMAT:
            source = "duodiff-fast-weights"
        else:
            source = "state-dict"
    layout: Optional[str] = None
    layout_error = None
    try:
        layout = detect_layout(extract_state_dict(obj, use_ema=use_ema))
    except (LayoutError, CheckpointError) as e:
        layout_error = str(e)
    args = dict(obj["args"]) if isinstance(obj.get("args"), Mapping) else {}
    return CheckpointInfo(layout, declared_time_input(obj, where), source, args, layout_error)


def checkpoint_spec(checkpoint: Union[str, os.PathLike], use_ema: bool = False):
    """The model config (a :class:`~duodiff_fast.models.configs.ModelSpec`) a checkpoint records,
    or None when it records none.

    Checkpoint folders and run folders give their ``config.json``; this package's training
    checkpoints and exported files give their ``model_config``, with the run's schedule (from
    the recorded ``TrainConfig``) and time input.
    """
    from .configs import REGISTRY, ModelSpec
    from .pretrained import pretrained_spec, resolve_pretrained_folder

    path = os.fspath(checkpoint)
    folder = resolve_pretrained_folder(path)
    if folder is not None:
        return pretrained_spec(folder)
    file, use_ema = resolve_checkpoint_path(path, use_ema)
    if file.endswith(".safetensors"):
        obj = load_checkpoint_object(file, use_ema)[0]
    else:
        obj = read_checkpoint_file(file, mmap=True)
    config = recorded_model_config(obj)
    if config is None:
        return None
    train = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    model = train.get("model")
    base = REGISTRY.get(model) if isinstance(model, str) else None
    if base is None and isinstance(model, str) and model.endswith(".json") and os.path.isfile(model):
        from .configs import load_spec_file

        base = load_spec_file(model)  # the JSON config the run was trained from
    schedule = train.get("schedule") or (base.schedule if base else "linear")
    return ModelSpec(os.path.splitext(os.path.basename(file))[0], dict(config), schedule,
                     latent=bool(base.latent) if base else False, source=file,
                     time_input=declared_time_input(obj, file) or (base.time_input if base else "index"),
                     model_type=str(obj.get("model_type", "uvit")))


def resolve_time_input(default: str, checkpoints: Sequence[Optional[Union[str, os.PathLike]]]) -> str:
    """The time input to sample with: what the given checkpoints declare, else ``default``.

    ``None`` entries are skipped. Checkpoints that declare different conventions cannot share one
    schedule (DuoDiff's two backbones use one): a :class:`CheckpointError` names them.
    """
    check_time_input(default)
    declared = {}
    for ck in checkpoints:
        if ck is None:
            continue
        ti = checkpoint_info(ck).time_input
        if ti is not None:
            declared[os.fspath(ck) if isinstance(ck, (str, os.PathLike)) else "checkpoint"] = ti
    values = set(declared.values())
    if len(values) > 1:
        raise CheckpointError(
            "the checkpoints declare different time inputs, so no one schedule fits them: "
            + ", ".join(f"{k}: {v}" for k, v in declared.items()))
    return values.pop() if values else default


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> Dict[str, object]:
    """Recover the UViT constructor keywords from a state dict's keys and shapes.

    The head count changes no weight shape, so it cannot be read from the weights. It is
    ``num_heads`` when given (e.g. from the DuoDiff authors' ``args``); else the head count of the
    registered configs the weights fit exactly (the published U-ViT and DuoDiff models); else a
    :class:`CheckpointError` names the ambiguity and how to resolve it. It is never guessed.
    """
    config = _shape_config(state_dict)
    if num_heads:
        config["num_heads"] = int(num_heads)
        return config
    fits = matching_configs(config)
    from .configs import REGISTRY

    heads = sorted({REGISTRY[n].kwargs["num_heads"] for n in fits})
    if len(heads) == 1:
        config["num_heads"] = heads[0]
        return config
    width = config["embed_dim"]
    options = [h for h in range(1, width + 1) if width % h == 0]
    shown = {k: v for k, v in config.items() if k not in ("num_heads", "qk_scale")}
    raise CheckpointError(
        f"cannot tell the attention head count of this U-ViT checkpoint: the weights (UViT({shown})) fit "
        f"any head count dividing embed_dim={width} ({', '.join(map(str, options))})"
        + (f" and the registered configs {fits} disagree ({heads})" if fits else
           ", the file does not record its config and it is not a registered config")
        + ". Pass the model config (--config NAME_OR_JSON on the command line, config= in "
        "load_model) or the head count (load_model(..., num_heads=N)); checkpoints written by "
        "this package's trainer (RUN/export/ema, RUN/latest.pt) record it")


def _shape_config(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """The UViT keywords the weights' shapes fix (``num_heads`` None: shapes cannot tell it)."""
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
    return dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=2 * n_in, num_heads=None, mlp_ratio=hidden // embed_dim if hidden % embed_dim == 0 else hidden / embed_dim,
        qkv_bias="mid_block.attn.qkv.bias" in state_dict, qk_scale=None,
        mlp_time_embed="time_embed.0.weight" in state_dict, num_classes=num_classes,
        conv="final_layer.weight" in state_dict,
        skip=any(k.endswith("skip_linear.weight") for k in state_dict) or n_in == 0,
    )


def _dit_heads_from_args(args: Mapping[str, object]) -> Optional[int]:
    """num_heads of a DiT ``train.py`` checkpoint from its ``args.model`` ("DiT-XL/2" -> 16)."""
    name = args.get("model") if isinstance(args, Mapping) else None
    if not isinstance(name, str) or not name.startswith("DiT-") or "/" not in name:
        return None
    from .configs import DIT_SIZES

    size = DIT_SIZES.get(name[4:].split("/")[0].lower())
    return size[2] if size else None


def _dit_num_heads(hidden: int, num_heads: Optional[int], registered: Mapping[int, int]) -> int:
    """The head count of a DiT of width ``hidden``: given, else the registered DiT size of that width
    (DiT-S/B/L/XL); refused otherwise (the weights cannot tell it, see :func:`infer_config`)."""
    if num_heads:
        return int(num_heads)
    if hidden in registered:
        return registered[hidden]
    raise CheckpointError(f"the DiT's head count cannot be told from its weights (hidden_size {hidden} is no "
                          "registered DiT size): pass --config (a registered name or a JSON model config) or "
                          "num_heads=")


def infer_dit_config(state_dict: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> Dict[str, object]:
    """Recover the DiT constructor keywords from a state dict with the official key names.

    Read from shapes: ``input_size`` (pos_embed tokens and the patch), ``patch_size``,
    ``in_channels``, ``hidden_size``, ``depth``, ``mlp_ratio``, ``learn_sigma`` (output channels =
    2 x in_channels) and the label table. Not in the weights: ``num_heads`` (pass it, else the
    registered DiT config of that width, else refused) and whether the table's last row is
    a null class; it is taken to be (``class_dropout_prob=0.1``, ``num_classes`` = rows - 1), as in
    every DiT trained with classifier-free guidance; pass an explicit config otherwise.
    """
    try:
        pe = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = state_dict["pos_embed"]  # (1, L, D)
        table = state_dict["y_embedder.embedding_table.weight"]  # (classes [+ 1], D)
        out = state_dict["final_layer.linear.weight"]  # (p*p*C_out, D)
    except KeyError as e:
        raise CheckpointError(f"not a DiT state dict: missing key {e.args[0]!r}") from None
    hidden, in_channels, patch = int(pe.shape[0]), int(pe.shape[1]), int(pe.shape[2])
    grid = int(round(int(pos.shape[1]) ** 0.5))
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    out_channels = int(out.shape[0]) // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"DiT final layer predicts {out_channels} channels for {in_channels} input channels "
                              "(expected in_channels, or 2 x in_channels with learn_sigma)")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    hidden_mlp = int(fc1.shape[0]) if fc1 is not None else 4 * hidden
    from .configs import REGISTRY

    heads = {s.kwargs["hidden_size"]: s.kwargs["num_heads"] for s in REGISTRY.values() if s.arch == "dit"}
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=_dit_num_heads(hidden, num_heads, heads),
        mlp_ratio=float(hidden_mlp) / hidden, class_dropout_prob=0.1, num_classes=int(table.shape[0]) - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


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


def _layout_line(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A hint when ``sd`` is another model's layout (or an unknown one), for mismatch reports."""
    from . import layouts

    try:
        layout = detect_layout(sd)
    except LayoutError as e:
        return f"  {e}"
    if layout in (layouts.DUODIFF_EARLY_EXIT, layouts.ADADIFF_OFFICIAL):
        who = "the DuoDiff authors' early-exit model" if layout == layouts.DUODIFF_EARLY_EXIT else "AdaDiff's"
        return (f"  the checkpoint has the layout of {who} ({layout}): load it with "
                "duodiff_fast.methods.adadiff_checkpoints.load_adadiff(path)")
    if layout == layouts.ADADIFF:
        return "  the checkpoint is an AdaDiffUViT's (backbone.*, heads.*, uems.*)"
    if layout == layouts.DIT:
        return "  the checkpoint is a DiT's (x_embedder.*, t_embedder.*, y_embedder.*, blocks.*, final_layer.*)"
    return None


def _mismatch_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    lines = key_mismatch_lines(model, sd)
    if not lines:
        return None
    hint = _layout_line(sd)
    if hint:
        lines.append(hint)
    is_dit = "x_embedder.proj.weight" in sd
    try:
        cfg = infer_dit_config(sd) if is_dit else _shape_config(sd)
        fits = matching_configs(cfg)
        if fits:
            lines.append(f"  the checkpoint fits config(s): {', '.join(fits)}")
        else:
            shown = {k: v for k, v in cfg.items() if k not in ("qk_scale", "num_heads")}
            lines.append(f"  the checkpoint looks like {'DiT' if is_dit else 'UViT'}({shown}), which is not a "
                         "registered config")
    except CheckpointError:
        lines.append("  the checkpoint does not look like a U-ViT or DiT state dict")
    return "\n".join(lines)


def load_weights(
    model: torch.nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, object]],
    use_ema: bool = False,
) -> torch.nn.Module:
    """Load a checkpoint (path or already-loaded dict) into ``model`` strictly; returns the model.

    Raises :class:`CheckpointError` before touching the model's parameters when keys or shapes
    differ, listing the differences and the registered configs the checkpoint would fit, and when
    the checkpoint records a model config (this package's exports and training checkpoints) that
    differs from ``model.config`` (e.g. another head count, which no weight shape shows). The time
    input the checkpoint declares is recorded as ``model.time_input`` (None when it does not say;
    see the module docstring).
    """
    is_path = isinstance(checkpoint, (str, os.PathLike))
    obj, use_ema, where = load_checkpoint_object(checkpoint, use_ema)
    sd = extract_state_dict(obj, use_ema=use_ema)
    report = _mismatch_report(model, sd)
    if report:
        raise CheckpointError(report.replace("checkpoint", f"checkpoint ({where})" if is_path else "checkpoint", 1))
    _check_recorded_config(model, obj, where)
    time_input = declared_time_input(obj, where)
    model.load_state_dict(sd, strict=True)
    model.time_input = time_input
    return model


def _check_recorded_config(model: torch.nn.Module, obj: Mapping[str, object], where: str) -> None:
    """CheckpointError when ``obj`` records a model config that ``model.config`` contradicts."""
    recorded = recorded_model_config(obj)
    own = getattr(model, "config", None)
    if recorded is None or not isinstance(own, dict):
        return
    keys = (set(recorded) | set(own)) - {"use_checkpoint"}
    differ = sorted(k for k in keys if recorded.get(k) != own.get(k))
    if differ:
        detail = ", ".join(f"{k}: checkpoint {recorded.get(k)!r} vs model {own.get(k)!r}" for k in differ)
        raise CheckpointError(f"checkpoint ({where}) records a different model config than the model's ({detail}); "
                              "load it without a config (load_model(path) / no --config) to use its own")


def load_model(
    checkpoint: Union[str, os.PathLike, Mapping[str, object]],
    config: Optional[Union[str, os.PathLike, Dict[str, object]]] = None,
    use_ema: bool = False,
    num_heads: Optional[int] = None,
):
    """Build the network (UViT or DiT) a checkpoint holds and load it.

    ``checkpoint``: a file (any format :func:`load_weights` reads), a checkpoint folder
    (``config.json`` + ``model.safetensors``), or a training run folder (its ``export/ema``: the
    EMA weights; pass ``RUN/export/raw`` for the raw ones).

    The architecture comes from, in this order: ``config`` (a registry name, a JSON model config
    path, or a dict of UViT keywords; when the checkpoint records its own config the two must
    agree); the config the checkpoint records (checkpoint folders, this package's training
    checkpoints and exports); the DuoDiff authors' ``args`` or DiT ``train.py``'s ``args.model``
    ("DiT-XL/2"); for the official DiT key names :func:`infer_dit_config`; the weights' shapes plus
    ``num_heads``, or the registered config they fit. A checkpoint whose head count nothing
    tells is refused (:func:`infer_config`), never guessed.
    """
    from .configs import create_model, get_spec
    from .dit import DiT
    from .model_types import get_model_type
    from .uvit import UViT

    obj, use_ema, where = load_checkpoint_object(checkpoint, use_ema)
    recorded = recorded_model_config(obj)
    if config is not None:
        if isinstance(config, Mapping):
            model = DiT(**config) if "hidden_size" in config else UViT(**config)
        else:
            model = create_model(get_spec(config))
    elif recorded is not None:
        model = get_model_type(str(obj.get("model_type", "uvit"))).build(dict(recorded))
    else:
        args = obj.get("args") if isinstance(obj.get("args"), Mapping) else {}
        sd = extract_state_dict(obj, use_ema=use_ema)
        try:
            if "x_embedder.proj.weight" in sd:  # the official DiT key names
                model = DiT(**infer_dit_config(sd, num_heads=num_heads or _dit_heads_from_args(args)))
            else:
                model = UViT(**infer_config(sd, num_heads=num_heads or args.get("num_heads")))
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
    if num_heads and getattr(model, "config", {}).get("num_heads") not in (None, num_heads):
        raise CheckpointError(f"{where}: num_heads={num_heads} contradicts the model config "
                              f"(num_heads={model.config['num_heads']})")
    try:
        return load_weights(model, obj, use_ema=use_ema)
    except CheckpointError as e:
        if isinstance(checkpoint, (str, os.PathLike)):
            raise CheckpointError(f"{os.fspath(checkpoint)}: {e}") from None
        raise


def save_weights(model: torch.nn.Module, path: Union[str, os.PathLike], time_input: Optional[str] = None,
                 record_config: bool = False) -> None:
    """Write the model's state dict atomically (``.safetensors`` by extension, else torch).

    ``time_input`` (default: ``model.time_input`` when a loaded checkpoint declared one) is
    recorded so that the file keeps its time-input convention: as safetensors metadata, or for
    torch files as ``{"format", "state_dict", "time_input"}`` when it is not the default
    ``"index"`` (a plain state dict otherwise, the official format every U-ViT loader reads).
    ``record_config=True`` also records ``model.config`` (``model_config``: the JSON of the
    constructor keywords in safetensors metadata, an entry of the torch dict), so that
    :func:`load_model` needs no config. For a whole checkpoint folder see
    :func:`duodiff_fast.models.pretrained.save_pretrained`.
    """
    from ..io_utils import atomic_torch_save, atomic_write_bytes

    if time_input is None:
        time_input = getattr(model, "time_input", None)
    if time_input is not None:
        check_time_input(time_input)
    config = None
    if record_config:
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            raise ValueError("record_config=True needs a model with a plain-data .config dict")
        config = {k: v for k, v in config.items() if k != "use_checkpoint"}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save

        meta = {"format": WEIGHTS_FORMAT, **({"time_input": time_input} if time_input else {})}
        if config is not None:
            meta["model_config"] = json.dumps(config)
        atomic_write_bytes(path, save(sd, metadata=meta))
    elif time_input not in (None, "index") or config is not None:
        atomic_torch_save({"format": WEIGHTS_FORMAT, "state_dict": sd, "time_input": time_input or "index",
                           **({"model_config": config} if config is not None else {})}, path)
    else:
        atomic_torch_save(sd, path)
