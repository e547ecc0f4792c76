"""CUDA graphs of the caching methods' steps: one graph per step pattern.

A caching policy (DeepCache, FORA, Learning-to-Cache; :mod:`duodiff_fast.methods.caching`) decides on
the host what step k recomputes -- DeepCache/FORA: a full or a cache step, L2C: the recomputed
branches of every layer -- before the step runs (``policy.pattern(model, k)``). Every step of one
pattern runs the same kernels on the same memory once the caches are static buffers (the policy's
``static`` mode: caches are written in place and survive a new trajectory), so one graph per
(pattern, batch, shape, dtype, device, model) serves them all: a full-step graph writes the cache
buffers, a cache-step graph reads them.

:class:`CacheStepGraphs` is attached to a :class:`~duodiff_fast.methods.caching.CachingDenoiser`
(``CacheStepGraphs().attach(denoiser)``); the denoiser still advances its step index on the host
each call and the runner replays the step's graph (capturing it the first time: eager warm-up on a
side stream, which also makes the cache buffers, then capture, then replay) and updates the host's
record of fresh caches (``policy.mark``). It also runs the step eagerly -- on a CPU, inside
:class:`~duodiff_fast.runtime.graphs.GraphSampler`'s warm-up and capture (its static-constants block:
the whole loop, every step's pattern included, becomes its one graph), for a policy without patterns (ToMe draws new destinations each step), or
after a capture failure (one warning per key). ``log`` records (step, pattern, how it ran) for each
call: "replay", "capture" (captured, then replayed) or "eager".

The cache buffers and graphs are made for one (batch, shape, dtype, device, model): a call with
another drops them all (the old graphs first, then the buffers they used) and captures anew, so
alternating batch sizes recapture each time (a batch change restarts the trajectory anyway).

The DuoDiff shallow phase of a composed denoiser is not a caching step and runs as before.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..samplers.constants import table_active
from ..validation import inputs_validated
from .graphs import capture_failure, capture_stream, graph_pool, on_device, static_buffer

__all__ = ["CacheStepGraphs"]


class _StepGraph:
    def __init__(self, graph, x: Tensor, timesteps: Tensor, y: Optional[Tensor], out: Tensor):
        self.graph, self.x, self.timesteps, self.y, self.out = graph, x, timesteps, y, out


class CacheStepGraphs:
    """Replays each caching step from the CUDA graph of its pattern (eager on a CPU).

    Args:
        warmup: eager runs of a step before its capture (>= 1; they also make the cache buffers).
    """

    def __init__(self, warmup: int = 1):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.warmup = warmup
        self.graphs: Dict[tuple, _StepGraph] = {}
        self.failed: Dict[tuple, str] = {}
        self.log: List[Tuple[int, Optional[tuple], str]] = []
        self.signature: Optional[tuple] = None  # what the graphs and cache buffers were made for

    def attach(self, denoiser):
        """Run ``denoiser``'s (a CachingDenoiser) full-backbone steps through this runner; its policy's
        caches become static buffers. Returns the denoiser."""
        policy = getattr(denoiser, "policy", None)
        if policy is None or not hasattr(denoiser, "step_runner"):
            raise TypeError(f"CacheStepGraphs attaches to a CachingDenoiser, got {type(denoiser).__name__}")
        policy.static = True
        policy.reset()
        denoiser.step_runner = self
        return denoiser

    def run(self, policy, model, x: Tensor, timesteps: Tensor, y: Optional[Tensor], step: int) -> Tensor:
        """``policy.forward(model, x, timesteps, y, step)``, from a graph where one can serve.

        x (B, C, H, W) in the model's dtype, timesteps (B,) float32 network input, y (B,) or None.
        """
        signature = (tuple(x.shape), x.dtype, str(x.device), y is not None, id(model))
        if signature != self.signature:
            self._drop(policy)
            self.signature = signature
        pattern_of = getattr(policy, "pattern", None)
        pattern = None if pattern_of is None else pattern_of(model, step)
        if (pattern is None or not (x.is_cuda and torch.cuda.is_available()) or table_active()
                or torch.cuda.is_current_stream_capturing()):
            self.log.append((step, pattern, "eager"))
            return policy.forward(model, x, timesteps, y, step)
        key = (pattern, signature)
        how = "replay"
        if key not in self.graphs and key not in self.failed:
            try:
                self.graphs[key] = self._capture(policy, model, x, timesteps, y, step)
                how = "capture"
            except Exception as exc:
                why = capture_failure(exc)
                if why is None:  # a real error: the eager step would fail too
                    raise
                self.failed[key] = why
                warnings.warn(f"CUDA graph capture of {policy.name} step pattern failed at {why}; running "
                              "those steps eagerly", RuntimeWarning, stacklevel=2)
        if key in self.failed:
            self.log.append((step, pattern, "eager"))
            return policy.forward(model, x, timesteps, y, step)
        entry = self.graphs[key]
        with on_device(x.device):
            entry.x.copy_(x)
            entry.timesteps.copy_(timesteps)
            if entry.y is not None:
                entry.y.copy_(y)
            entry.graph.replay()
            policy.mark(model, pattern)
            self.log.append((step, pattern, how))
            return entry.out.clone()

    def _drop(self, policy) -> None:
        """Forget every graph, then the policy's cache buffers (which those graphs read and write)."""
        self.graphs.clear()
        self.failed.clear()
        policy.static = False
        try:
            policy.reset()  # not static: drops the buffers
        finally:
            policy.static = True
        policy.reset()

    def _capture(self, policy, model, x, timesteps, y, step) -> _StepGraph:
        dev = x.device
        xs, ts = static_buffer(x.clone), static_buffer(timesteps.clone)
        ys = None if y is None else static_buffer(y.clone)
        with on_device(dev), torch.inference_mode(False), torch.no_grad(), inputs_validated():
            side = capture_stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                # Eager runs of this very step: they make the cache buffers and leave them as the
                # step leaves them (a step writes a buffer before reading it, or only reads it).
                for _ in range(self.warmup):
                    policy.forward(model, xs, ts, ys, step)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=graph_pool(dev), stream=side):
                out = policy.forward(model, xs, ts, ys, step)
        return _StepGraph(graph, xs, ts, ys, out)
