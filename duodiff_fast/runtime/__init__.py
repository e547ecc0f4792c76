"""Sampler runtime: CUDA-graph-captured sampling (:mod:`.graphs`). The graph-safe device constants
it records live below the samplers, in :mod:`duodiff_fast.samplers.constants` (re-exported here).
Importing this package touches no CUDA state."""
from ..samplers.constants import ConstantTable, device_constant, static_constants  # noqa: F401

__all__ = ["ConstantTable", "device_constant", "static_constants", "GraphSampler", "GraphDenoiser", "GraphKey"]


def __getattr__(name):  # lazy: graphs imports the samplers and methods
    if name in ("GraphSampler", "GraphDenoiser", "GraphKey", "HostRoutedDenoiser", "choose_bucket"):
        from . import graphs

        return getattr(graphs, name)
    raise AttributeError(name)
