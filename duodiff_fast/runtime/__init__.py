"""Sampler runtime: CUDA-graph-captured sampling (:mod:`.graphs`) and graph-safe device constants
(:mod:`.constants`). Importing this package touches no CUDA state."""
from .constants import ConstantTable, device_constant, static_constants  # noqa: F401

__all__ = ["ConstantTable", "device_constant", "static_constants", "GraphSampler", "GraphDenoiser", "GraphKey"]


def __getattr__(name):  # lazy: graphs imports the samplers, which import constants
    if name in ("GraphSampler", "GraphDenoiser", "GraphKey", "HostRoutedDenoiser", "choose_bucket"):
        from . import graphs

        return getattr(graphs, name)
    raise AttributeError(name)
