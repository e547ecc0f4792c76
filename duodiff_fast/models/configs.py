"""Registry of named U-ViT and DiT configurations.

Each entry holds the official constructor keywords (of ``UViT`` or ``DiT``, told apart by
``ModelSpec.arch``) plus what a user needs to sample from it: the
noise schedule it was trained with, whether it works in a latent space, and the published source.
Every full configuration has a DuoDiff shallow twin named ``<name>-shallow``: the same width, heads
and tokens and three transformer layers (U-ViT ``depth=2``: one in-block, the mid-block and one
out-block; DiT ``depth=3`` blocks).

Names:
    DuoDiff paper (Table 3): cifar10-s2, celeba64-s4, imagenet64-m4, imagenet256-l2
    other published U-ViT configs: imagenet64-l4, imagenet256-h2, imagenet512-l4, imagenet512-h4
    small configs for tests and CPU benchmarks: tiny, tiny-cond, tiny-latent
    DiT (facebookresearch/DiT): dit-{xl,l,b,s}{2,4,8}-{256,512} (DiT-XL/2 at 256 is dit-xl2-256;
    latent 4x32x32 at 256, 4x64x64 at 512, 1000 classes + null, the improved-DDPM linear schedule)
    and dit-tiny (a small latent DiT for tests and CPU benchmarks)

Model configs as JSON. Wherever a config name is accepted (``get_spec``, ``create_model``, the
CLI's ``--config``), a path to a JSON file, or a checkpoint folder holding a ``config.json``, is
accepted too. ``duodiff-fast configs --show NAME`` prints one to start from::

    {
      "model_type": "uvit",            # a registered model type (see .model_types)
      "name": "tiny-cond",             # optional; default: the file's stem
      "schedule": "linear",            # optional noise schedule (default "linear")
      "time_input": "index",           # optional: "index" (default) or "normalized"
      "latent": false,                 # optional: true for Stable Diffusion KL-f8 latent models
      "source": "...",                 # optional free text
      "model": {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4,
                "num_heads": 4, "mlp_ratio": 4, "qkv_bias": false, "qk_scale": null,
                "mlp_time_embed": false, "num_classes": 11, "conv": true, "skip": true}
    }

``model`` holds the constructor keywords; for ``uvit`` img_size, patch_size, in_chans,
embed_dim, depth and num_heads are required (the head count changes no weight shape, so it is
never guessed), the others default as above. Checkpoint folders' ``config.json`` files are such
configs plus what the folder records about its weights (:data:`FOLDER_KEYS`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

from .model_types import get_model_type

SHALLOW_DEPTH = 2  # DuoDiff's shallow backbone: 1 in-block + mid-block + 1 out-block = 3 layers
SHALLOW_DIT_DEPTH = 3  # the same three transformer layers for DiT (no mid-block)
SHALLOW_SUFFIX = "-shallow"

# What the network is fed at time t (see ModelSpec.time_input); the same names as
# duodiff_fast.schedules.DiscreteSchedule.TIME_INPUTS.
TIME_INPUTS = ("index", "normalized")


def check_time_input(time_input) -> str:
    """Return ``time_input`` if it is one of :data:`TIME_INPUTS`; a clear ValueError otherwise."""
    if time_input not in TIME_INPUTS:
        raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
    return time_input


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named configuration.

    Attributes:
        name: registry name.
        kwargs: official constructor keywords of the ``arch``'s class.
        schedule: name of the noise schedule it is trained/sampled with (see duodiff_fast.schedules).
        latent: True when the model works on Stable Diffusion KL-f8 latents (scale 0.18215).
        source: where the configuration comes from.
        time_input: what the network is fed at time t when its checkpoint does not say:
            "index" (discrete schedules: the step index 0..N-1; the continuous VP schedule:
            t * 999), or "normalized" (discrete only: index / N, as the DuoDiff authors'
            CIFAR-10/CelebA models with ``normalize_timesteps``). Checkpoints that declare their
            own convention override it (see duodiff_fast.models.checkpoint).
        arch: "uvit" (:class:`~duodiff_fast.models.uvit.UViT`) or "dit"
            (:class:`~duodiff_fast.models.dit.DiT`).
    """

    name: str
    kwargs: Dict[str, object]
    schedule: str
    latent: bool = False
    source: str = ""
    time_input: str = "index"
    model_type: str = "uvit"

    def __post_init__(self) -> None:
        check_time_input(self.time_input)
        get_model_type(self.model_type)  # ValueError naming the registered types

    @property
    def arch(self) -> str:
        """The backbone family (``"uvit"`` or ``"dit"``): the model type's name."""
        return self.model_type

    def build(self, **overrides):
        """A fresh model of this configuration; ``overrides`` replace constructor keywords
        (``use_checkpoint`` turns on gradient checkpointing)."""
        mtype = get_model_type(self.model_type)
        unknown = set(overrides) - set(mtype.keywords) - {"use_checkpoint"}
        if unknown:
            raise TypeError(f"unknown {mtype.display} keyword(s) {sorted(unknown)}; valid: {sorted(mtype.keywords)}")
        kwargs = dict(self.kwargs)
        kwargs.update(overrides)
        return mtype.build(kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON model config of this spec (see the module docstring)."""
        return {"model_type": self.model_type, "name": self.name, "schedule": self.schedule,
                "time_input": self.time_input, "latent": bool(self.latent), "source": self.source,
                "model": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model config",
                  default_name: str = "custom") -> "ModelSpec":
        """Parse a JSON model config; ValueError names the first problem and ``where`` it is."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: a model config is a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SPEC_KEYS) - set(FOLDER_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a model config has {sorted(SPEC_KEYS)}")
        if "model_type" not in d or "model" not in d:
            raise ValueError(f"{where}: a model config needs 'model_type' (e.g. \"uvit\") and 'model' "
                             "(the constructor keywords); `duodiff-fast configs --show tiny` prints an example")
        mtype = get_model_type(str(d["model_type"]))
        mtype.check_kwargs(d["model"], where)
        kwargs = dict(mtype_defaults(mtype.name), **d["model"])
        time_input = d.get("time_input", "index")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"{where}: time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        if not isinstance(d.get("latent", False), bool):
            raise ValueError(f"{where}: latent must be true or false, got {d['latent']!r}")
        return cls(name=str(d.get("name") or default_name), kwargs=kwargs,
                   schedule=str(d.get("schedule") or "linear"), latent=bool(d.get("latent", False)),
                   source=str(d.get("source") or where), time_input=time_input, model_type=mtype.name)

    def make_schedule(self, schedule: Optional[str] = None, time_input: Optional[str] = None):
        """The noise schedule to sample/train with: ``schedule`` (default: the config's) feeding
        the network ``time_input`` (default: the config's)."""
        from ..schedules import make_schedule

        return make_schedule(schedule or self.schedule, time_input or self.time_input)

    def shallow(self) -> "ModelSpec":
        """The DuoDiff shallow backbone of this configuration (three layers, same width)."""
        if self.model_type not in ("uvit", "dit"):
            raise ValueError(f"DuoDiff's shallow twin is defined for U-ViT and DiT configs, not {self.model_type!r}")
        kwargs = dict(self.kwargs, depth=SHALLOW_DIT_DEPTH if self.model_type == "dit" else SHALLOW_DEPTH)
        return dataclasses.replace(
            self, name=self.name + SHALLOW_SUFFIX, kwargs=kwargs,
            source=f"DuoDiff shallow backbone of {self.name}",
        )


# Top-level keys of a JSON model config, and the extra ones a checkpoint folder's config.json holds.
SPEC_KEYS = ("model_type", "name", "schedule", "time_input", "latent", "source", "model")
FOLDER_KEYS = ("format", "weights", "step", "ema", "train")


def mtype_defaults(model_type: str) -> Dict[str, object]:
    """Keywords a JSON config of ``model_type`` may leave out, with their values."""
    if model_type == "uvit":
        return {k: v for k, v in _uvit(0, 0, 0, 0, 0).items()
                if k not in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    if model_type == "dit":
        return dict(mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)
    return {}


def _uvit(img_size, patch_size, embed_dim, depth, num_heads, *, in_chans=3, num_classes=-1,
          conv=True, qkv_bias=False, mlp_time_embed=False) -> Dict[str, object]:
    return dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=4, qkv_bias=qkv_bias, qk_scale=None,
        mlp_time_embed=mlp_time_embed, num_classes=num_classes, conv=conv, skip=True,
    )


# ImageNet class-conditional models carry 1000 classes plus the null class used by CFG.
_IMAGENET_CLASSES = 1001

_FULL_SPECS: List[ModelSpec] = [
    ModelSpec("cifar10-s2", _uvit(32, 2, 512, 12, 8), "linear",
              source="DuoDiff paper, CIFAR-10 U-ViT-S/2 (13 layers, discrete DDPM)"),
    ModelSpec("celeba64-s4", _uvit(64, 4, 512, 12, 8), "linear",
              source="DuoDiff paper, CelebA 64x64 U-ViT-S/4 (13 layers, discrete DDPM)"),
    ModelSpec("imagenet64-m4", _uvit(64, 4, 768, 16, 12, num_classes=_IMAGENET_CLASSES), "vp-linear",
              source="U-ViT ImageNet 64x64 M/4 (official weights; DuoDiff paper's 17-layer model)"),
    ModelSpec("imagenet256-l2",
              _uvit(32, 2, 1024, 20, 16, in_chans=4, num_classes=_IMAGENET_CLASSES), "vp-linear",
              latent=True,
              source="U-ViT ImageNet 256x256 latent L/2 (official weights; DuoDiff paper's 21-layer model)"),
    ModelSpec("imagenet64-l4", _uvit(64, 4, 1024, 20, 16, num_classes=_IMAGENET_CLASSES), "vp-linear",
              source="U-ViT ImageNet 64x64 L/4 (official)"),
    ModelSpec("imagenet256-h2",
              _uvit(32, 2, 1152, 28, 16, in_chans=4, num_classes=_IMAGENET_CLASSES, conv=False),
              "scaled-linear", latent=True, source="U-ViT ImageNet 256x256 latent H/2 (official)"),
    ModelSpec("imagenet512-l4",
              _uvit(64, 4, 1024, 20, 16, in_chans=4, num_classes=_IMAGENET_CLASSES), "vp-linear",
              latent=True, source="U-ViT ImageNet 512x512 latent L/4 (official)"),
    ModelSpec("imagenet512-h4",
              _uvit(64, 4, 1152, 28, 16, in_chans=4, num_classes=_IMAGENET_CLASSES, conv=False),
              "scaled-linear", latent=True, source="U-ViT ImageNet 512x512 latent H/4 (official)"),
    # Small configurations: unit tests and the CPU default of the latency benchmark.
    ModelSpec("tiny", _uvit(16, 2, 64, 4, 4), "linear", source="small test configuration"),
    ModelSpec("tiny-cond", _uvit(16, 2, 64, 4, 4, num_classes=11), "linear",
              source="small class-conditional test configuration (10 classes + null)"),
    ModelSpec("tiny-latent",
              _uvit(8, 2, 64, 4, 4, in_chans=4, num_classes=11, qkv_bias=True, mlp_time_embed=True,
                    conv=False),
              "vp-linear", latent=True, source="small latent test configuration"),
]

def _dit(input_size, patch_size, hidden_size, depth, num_heads, *, in_channels=4, num_classes=1000,
         class_dropout_prob=0.1, learn_sigma=True) -> Dict[str, object]:
    return dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                depth=depth, num_heads=num_heads, mlp_ratio=4.0, class_dropout_prob=class_dropout_prob,
                num_classes=num_classes, learn_sigma=learn_sigma)


# DiT sizes of the official DiT_models table: (hidden_size, depth, num_heads).
DIT_SIZES = {"xl": (1152, 28, 16), "l": (1024, 24, 16), "b": (768, 12, 12), "s": (384, 12, 6)}
DIT_RESOLUTIONS = {256: 32, 512: 64}  # image side -> SD KL-f8 latent side


def _dit_specs() -> List[ModelSpec]:
    specs = []
    for size, (width, depth, heads) in DIT_SIZES.items():
        for patch in (2, 4, 8):
            for res, latent_side in DIT_RESOLUTIONS.items():
                specs.append(ModelSpec(
                    f"dit-{size}{patch}-{res}", _dit(latent_side, patch, width, depth, heads), "linear",
                    latent=True, model_type="dit",
                    source=f"DiT-{size.upper()}/{patch} ImageNet {res}x{res} (facebookresearch/DiT; improved-DDPM "
                           "linear betas, 1000 steps, learned variance)"))
    specs.append(ModelSpec("dit-tiny", _dit(8, 2, 64, 4, 4, num_classes=10), "linear", latent=True, model_type="dit",
                           source="small latent DiT for tests and CPU benchmarks (10 classes + null)"))
    return specs


_FULL_SPECS += _dit_specs()

PAPER_CONFIGS = ("cifar10-s2", "celeba64-s4", "imagenet64-m4", "imagenet256-l2")

REGISTRY: Dict[str, ModelSpec] = {}
for _spec in _FULL_SPECS:
    REGISTRY[_spec.name] = _spec
    REGISTRY[_spec.name + SHALLOW_SUFFIX] = _spec.shallow()


def list_configs() -> List[str]:
    """All registered configuration names."""
    return sorted(REGISTRY)


SpecLike = Union[str, "os.PathLike[str]", ModelSpec]


def load_spec_file(path: Union[str, "os.PathLike[str]"]) -> ModelSpec:
    """Read a JSON model config (or a checkpoint folder's ``config.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .pretrained import resolve_pretrained_folder

        path = os.path.join(resolve_pretrained_folder(path) or path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem == "config":  # a folder's config.json: name it after the folder
        stem = os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return ModelSpec.from_dict(data, where=path, default_name=stem)


def get_spec(name: SpecLike) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``: a registered name, a path to a JSON model config, a
    checkpoint folder (its ``config.json``) or a run folder (its ``export/ema``), or a spec
    (returned as is).

    Unknown names raise KeyError listing the known ones.
    """
    if isinstance(name, ModelSpec):
        return name
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name not in REGISTRY and (
            name.endswith(".json") or os.path.isdir(name) or os.sep in name)):
        path = os.fspath(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model config {path!r}: no such JSON file or checkpoint folder")
        if os.path.isdir(path):
            from .pretrained import resolve_pretrained_folder

            if resolve_pretrained_folder(path) is None:
                raise FileNotFoundError(f"model config {path!r}: the folder is not a checkpoint folder "
                                        "(config.json + model.safetensors) nor a run folder with export/ema")
        return load_spec_file(path)
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known configs: {', '.join(list_configs())} "
                       "(or give a path to a JSON model config)") from None


def spec_json(name: SpecLike) -> str:
    """The JSON model config of ``name`` (what ``duodiff-fast configs --show`` prints)."""
    return json.dumps(get_spec(name).to_dict(), indent=2)


def get_config(name: SpecLike) -> Dict[str, object]:
    """The constructor keywords of config ``name`` (UViT's or DiT's, see ``get_spec(name).model_type``; a fresh dict)."""
    return dict(get_spec(name).kwargs)


def shallow_spec(name: SpecLike) -> ModelSpec:
    """The DuoDiff shallow twin of a full config (registered ``<name>-shallow``, or depth 2 of a JSON config)."""
    spec = get_spec(name)
    if spec.name in REGISTRY and REGISTRY[spec.name] is spec:
        return get_spec(shallow_name(spec.name))
    return spec.shallow()


def shallow_name(name: str) -> str:
    """Name of the DuoDiff shallow twin of a full config."""
    if name.endswith(SHALLOW_SUFFIX):
        raise ValueError(f"{name!r} is already a shallow config")
    get_spec(name + SHALLOW_SUFFIX)
    return name + SHALLOW_SUFFIX


def matching_configs(config: Dict[str, object], ignore: tuple = ("num_heads", "qk_scale")) -> List[str]:
    """Registry names whose keywords equal ``config`` on every key except ``ignore``."""
    out = []
    for name, spec in REGISTRY.items():
        keys = set(spec.kwargs) | set(config)
        if all(spec.kwargs.get(k) == config.get(k) for k in keys if k not in ignore):
            out.append(name)
    return sorted(out)


def create_model(name: SpecLike, **overrides):
    """Build the network (UViT or DiT) of config ``name`` (see :func:`get_spec`: a name, a JSON path
    or a spec); keyword ``overrides`` replace config entries.

    Example: ``create_model("cifar10-s2")``, ``create_model("imagenet256-l2-shallow")``,
    ``create_model("tiny", depth=6)``, ``create_model("dit-xl2-256")``, ``create_model("my_model.json")``.
    """
    return get_spec(name).build(**overrides)


def describe(name: Optional[str] = None) -> str:
    """A human-readable table of the registry (or of one entry)."""
    names = [name] if name else list_configs()
    rows = []
    for n in names:
        s = get_spec(n)
        k = s.kwargs
        if s.arch == "dit":
            rows.append(
                f"{n:24s} img={k['input_size']:<3} p={k['patch_size']} C={k['in_channels']} D={k['hidden_size']:<5}"
                f" depth={k['depth']:<3} heads={k['num_heads']:<3} classes={k['num_classes'] + 1:<5}"
                f" schedule={s.schedule}{' latent' if s.latent else ''} (DiT)"
            )
            continue
        rows.append(
            f"{n:24s} img={k['img_size']:<3} p={k['patch_size']} C={k['in_chans']} D={k['embed_dim']:<5}"
            f" depth={k['depth']:<3} heads={k['num_heads']:<3} classes={k['num_classes']:<5}"
            f" schedule={s.schedule}{' latent' if s.latent else ''}"
        )
    return "\n".join(rows)
