"""Registry of model types: how a ``model_type`` name in a model config becomes a network.

A model config (see :mod:`.configs`) names its architecture with ``model_type`` and holds the
constructor keywords under ``model``. Each type registered here says which keywords it takes,
which of them are required, and how to build the network; checkpoint folders
(:mod:`.pretrained`) use the same registry, so a new architecture (DiT, an EDM U-Net) becomes
loadable from ``config.json`` + ``model.safetensors`` by registering itself once:

    register_model_type(ModelType("dit", build=lambda kw: DiT(**kw), keywords=(...), required=(...)))

This package registers ``"uvit"`` and ``"dit"``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class ModelType:
    """One architecture a model config can name.

    Attributes:
        name: the ``model_type`` string.
        build: constructor keywords -> ``nn.Module`` (the module should keep its keywords as a
            plain-data ``.config`` dict, which :func:`.pretrained.save_pretrained` records).
        keywords: every keyword a config may give (others are refused by name).
        required: keywords a config must give (the rest take the constructor's defaults).
    """

    name: str
    build: Callable[[Dict[str, object]], torch.nn.Module]
    keywords: Tuple[str, ...]
    required: Tuple[str, ...] = ()
    label: str = ""  # how messages name it (default: name)

    @property
    def display(self) -> str:
        return self.label or self.name

    def check_kwargs(self, kwargs: Mapping[str, object], where: str = "model config") -> None:
        """Raise ValueError naming unknown or missing keywords."""
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{where}: 'model' must be an object of {self.display} keywords, got {type(kwargs).__name__}")
        unknown = sorted(set(kwargs) - set(self.keywords))
        if unknown:
            raise ValueError(f"{where}: unknown {self.display} keyword(s) {unknown}; valid: {sorted(self.keywords)}")
        missing = [k for k in self.required if k not in kwargs]
        if missing:
            raise ValueError(f"{where}: {self.display} keyword(s) {missing} are required")


MODEL_TYPES: Dict[str, ModelType] = {}


def register_model_type(model_type: ModelType, replace: bool = False) -> ModelType:
    """Add ``model_type`` to the registry (ValueError if the name is taken and not ``replace``)."""
    if model_type.name in MODEL_TYPES and not replace:
        raise ValueError(f"model type {model_type.name!r} is already registered")
    MODEL_TYPES[model_type.name] = model_type
    return model_type


def get_model_type(name: str) -> ModelType:
    """The registered :class:`ModelType` called ``name``; ValueError lists the known ones."""
    try:
        return MODEL_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown model_type {name!r}; registered: {sorted(MODEL_TYPES)}") from None


def _build_uvit(kwargs: Dict[str, object]) -> torch.nn.Module:
    from .uvit import UViT

    return UViT(**kwargs)


UVIT_KEYWORDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                 "qkv_bias", "qk_scale", "mlp_time_embed", "num_classes", "conv", "skip", "use_checkpoint")
# num_heads is required: it changes no weight shape, so nothing else could tell it.
UVIT_REQUIRED = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")

register_model_type(ModelType("uvit", _build_uvit, UVIT_KEYWORDS, UVIT_REQUIRED, label="UViT"))


def _build_dit(kwargs: Dict[str, object]) -> torch.nn.Module:
    from .dit import DiT

    kwargs = dict(kwargs)
    use_checkpoint = kwargs.pop("use_checkpoint", None)  # DiT's constructor has no such keyword
    model = DiT(**kwargs)
    if use_checkpoint is not None:
        model.use_checkpoint = bool(use_checkpoint)
    return model


# The official DiT constructor keywords (facebookresearch/DiT models.py).
DIT_KEYWORDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "class_dropout_prob", "num_classes", "learn_sigma", "use_checkpoint")
DIT_REQUIRED = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")
register_model_type(ModelType("dit", _build_dit, DIT_KEYWORDS, DIT_REQUIRED, label="DiT"))
