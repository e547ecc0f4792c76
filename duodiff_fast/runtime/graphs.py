"""CUDA-graph-captured sampling: the whole fixed-step loop (or each denoiser call) as a graph.

:class:`GraphSampler` captures, per (solver settings, batch bucket, sample shape, dtype, device,
conditional or not), the complete sampling loop -- starting noise, every denoiser evaluation
(DuoDiff's switch between its two backbones, ASE's kept blocks and multistage's stage included, also
under classifier-free guidance: the routing of each step is decided on the host while capturing,
from the step's time), every solver update -- into one
``torch.cuda.CUDAGraph``. A call writes new seeds and labels into the graph's static buffers and
replays it: no recapture. Noise is Philox (:class:`~duodiff_fast.samplers.philox.PhiloxNoise`),
a pure function of (seed, step, element), so the replay draws each sample's own noise and padding a
batch up to a bucket does not change the real rows. All graphs of a device share one memory pool.

A capture error logs one warning per key and that key runs the plain loop instead -- which is also
what runs on a CPU. Both give the same images as
``sample(..., noise="philox", fused=True)`` with the same seeds.

:class:`GraphDenoiser` is the per-step variant: it captures ``denoiser(x, t, y)`` (one graph per
backbone route) for solvers whose loop stays in Python.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..profiling import nvtx_range
from ..validation import inputs_validated
from ..samplers.constants import ConstantTable, GraphUnsafe, bind_host_time, host_time, static_constants

__all__ = ["GraphKey", "GraphSampler", "GraphDenoiser", "choose_bucket", "graph_pool", "HostRoutedDenoiser"]

_POOLS: Dict[str, object] = {}


def graph_pool(device) -> object:
    """The memory pool shared by every graph of this runtime on ``device``."""
    key = str(torch.device(device))
    if key not in _POOLS:
        _POOLS[key] = torch.cuda.graph_pool_handle()
    return _POOLS[key]


def choose_bucket(batch: int, buckets: Optional[Sequence[int]]) -> int:
    """The batch size a graph is captured for: the smallest bucket >= ``batch``, else ``batch``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    fits = sorted(int(b) for b in (buckets or ()) if int(b) >= batch)
    return fits[0] if fits else batch


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """What a captured graph is specific to."""

    solver: str
    options: Tuple[Tuple[str, object], ...]  # solver settings, sorted (num_steps, eta, ...)
    batch: int
    sample_shape: Tuple[int, ...]
    dtype: str
    device: str
    conditional: bool
    denoiser: int  # id() of the denoiser (model + backend): another denoiser is another graph

    @staticmethod
    def make(solver, options: dict, batch, sample_shape, dtype, device, conditional, denoiser) -> "GraphKey":
        return GraphKey(solver, tuple(sorted(options.items())), int(batch), tuple(int(s) for s in sample_shape),
                        str(dtype), str(torch.device(device)), bool(conditional), id(denoiser))


class HostRoutedDenoiser:
    """A denoiser seen by the route it takes at a step whose time the host knows.

    Routed denoisers (DuoDiff's backbones, ASE's kept blocks, multistage's stage, and
    classifier-free guidance around any of them) choose their path from
    :func:`~duodiff_fast.samplers.constants.host_time` inside the runtime, without reading the
    device, and say which through ``host_route(t)``; the graph of a call is specific to that
    route. :meth:`route` is "model" for a denoiser without routes and None where the route is not
    known on the host (rows at different times): then the call is not captured.
    """

    def __init__(self, denoiser):
        self.inner = denoiser

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def route(self, t: Tensor):
        host_route = getattr(self.inner, "host_route", None)
        return "model" if host_route is None else host_route(t)

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        route = self.route(t)
        if route is None:
            return self.inner(x, t, y)
        with nvtx_range(f"route {route}"):
            return self.inner(x, t, y)


class _Captured:
    """One captured loop: the graph, its static inputs and output."""

    def __init__(self, graph, seeds: Tensor, y: Optional[Tensor], out: Tensor, table: ConstantTable):
        self.graph, self.seeds, self.y, self.out, self.table = graph, seeds, y, out, table


class GraphSampler:
    """Sampling with the whole fixed-step loop captured in a CUDA graph (plain loop on a CPU).

    Args:
        denoiser: ``eps = denoiser(x, t, y)`` (a ``ModelDenoiser``, ``DuoDiff``, ...).
        schedule: its noise schedule.
        sample_shape: (C, H, W) of one sample.
        solver, num_steps and ``solver_options`` (eta, order, method, skip_type, spacing,
            variance, predict_x0, t_end): as :func:`duodiff_fast.samplers.sample`.
        device, dtype: where and in which dtype to sample.
        buckets: batch sizes to capture; a call with B samples replays the smallest bucket >= B
            (extra rows are padding, dropped). None: capture each batch size exactly.
        warmup: eager runs before capture (they also record the step constants).

    ``sampler(seeds, y=None)`` -> (B, C, H, W) samples, equal to
    ``sample(denoiser, schedule, (B, C, H, W), seeds=seeds, y=y, noise="philox", fused=True, ...)``.
    """

    def __init__(
        self,
        denoiser,
        schedule,
        sample_shape: Sequence[int],
        *,
        solver: str = "ddim",
        num_steps: Optional[int] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        buckets: Optional[Sequence[int]] = None,
        warmup: int = 2,
        **solver_options,
    ):
        from ..samplers.driver import _check_shape, _check_solver

        _check_solver(solver)
        self.sample_shape = _check_shape((1, *tuple(sample_shape)))[1:]
        self.denoiser = denoiser
        self.schedule = schedule
        self.solver = solver
        self.num_steps = num_steps
        self.options = dict(solver_options)
        from ..devices import normalize_device

        self.device = normalize_device(device)  # "cuda" -> "cuda:<current>" (see duodiff_fast.devices)
        self.dtype = dtype
        self.buckets = tuple(buckets) if buckets else None
        self.warmup = max(1, int(warmup))
        self.graphs: Dict[GraphKey, _Captured] = {}
        self.failed: Dict[GraphKey, str] = {}

    # ---- the plain loop (CPU, fallback, reference) ---------------------------------------------
    def plain(self, seeds, y: Optional[Tensor] = None) -> Tensor:
        """The uncaptured loop with the same noise and updates (what a CPU runs)."""
        from ..samplers.driver import sample

        B = len(seeds)
        return sample(self.denoiser, self.schedule, (B, *self.sample_shape), solver=self.solver,
                      num_steps=self.num_steps, y=y, seeds=seeds, device=self.device, dtype=self.dtype,
                      progress=False, noise="philox", fused=True, **self.options)

    def uses_graphs(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def key(self, batch: int, conditional: bool) -> GraphKey:
        return GraphKey.make(self.solver, {"num_steps": self.num_steps, **self.options}, batch, self.sample_shape,
                             self.dtype, self.device, conditional, self.denoiser)

    # ---- capture ---------------------------------------------------------------------------------
    def _body(self, seeds: Tensor, y: Optional[Tensor]) -> Tensor:
        """The sampling loop on static buffers (run eagerly for warm-up, then under capture)."""
        from ..samplers.driver import _build
        from ..samplers.philox import PhiloxNoise

        o = self.options
        run, _ = _build(self.solver, self.denoiser, self.schedule, self.num_steps,
                        o.get("eta", 0.0), o.get("order"), o.get("variance", "beta"), o.get("spacing"),
                        o.get("method"), o.get("skip_type"), o.get("predict_x0"),
                        o.get("t_end"), True)
        noise = PhiloxNoise(seeds, device=self.device, dtype=self.dtype)
        x_T = noise.initial((seeds.shape[0], *self.sample_shape))
        return run(x_T, y, noise, None)

    def capture(self, key: GraphKey) -> _Captured:
        """Warm up and capture the loop for ``key`` (raises on a capture error)."""
        dev = self.device
        seeds = torch.zeros(key.batch, dtype=torch.int64, device=dev)
        y = torch.zeros(key.batch, dtype=torch.long, device=dev) if key.conditional else None
        table = ConstantTable()
        check = getattr(self.denoiser, "check", None)
        if check is not None:  # shape/label checks once, eagerly (the loop runs with values trusted)
            check(torch.zeros((key.batch, *self.sample_shape), device=dev, dtype=self.dtype),
                  torch.full((key.batch,), self.schedule.t_max, dtype=torch.float64, device=dev), y)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), inputs_validated(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                with static_constants(table, recording=True):
                    self._body(seeds, y)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), inputs_validated(), static_constants(table, recording=False):
            with torch.cuda.graph(graph, pool=graph_pool(dev)):
                out = self._body(seeds, y)
        return _Captured(graph, seeds, y, out, table)

    # ---- sampling --------------------------------------------------------------------------------
    def __call__(self, seeds, y: Optional[Tensor] = None) -> Tensor:
        return self.sample(seeds, y)

    def sample(self, seeds, y: Optional[Tensor] = None) -> Tensor:
        """(B, C, H, W) samples for per-sample ``seeds`` (B ints or a (B,) int tensor) and labels ``y``."""
        from ..samplers.philox import _seed_tensor

        seed_t = _seed_tensor(seeds, torch.device("cpu"))
        B = int(seed_t.shape[0])
        if not self.uses_graphs():
            return self.plain(seeds, y)
        bucket = choose_bucket(B, self.buckets)
        key = self.key(bucket, y is not None)
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed:
            try:
                entry = self.graphs[key] = self.capture(key)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly once
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture failed for {key}; running the plain loop ({self.failed[key]})",
                              RuntimeWarning, stacklevel=2)
        if entry is None:
            return self.plain(seeds, y)
        with nvtx_range(f"graph replay {self.solver} B={bucket}"):
            entry.seeds.zero_()
            entry.seeds[:B].copy_(seed_t, non_blocking=True)
            if entry.y is not None:
                entry.y.zero_()
                entry.y[:B].copy_(y.reshape(-1).to(torch.long), non_blocking=True)
            entry.graph.replay()
            return entry.out[:B].clone()


class GraphDenoiser:
    """``denoiser(x, t, y)`` replayed from CUDA graphs, one per (batch, shape, dtype, route).

    For solvers whose loop stays in Python: each call copies x, t (and y) into static buffers,
    replays and returns a copy of the output. Routed denoisers (DuoDiff, ASE, multistage, CFG around
    them) route on the host when the step's time is known (inside
    :func:`~duodiff_fast.samplers.constants.static_constants`), else their plain call runs. On a CPU, or
    after a capture error (one warning), the denoiser is called directly.
    """

    def __init__(self, denoiser: Callable, warmup: int = 2):
        self.inner = HostRoutedDenoiser(denoiser)
        self.warmup = max(1, int(warmup))
        self.graphs: Dict[tuple, tuple] = {}
        self.failed: Dict[tuple, str] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _route(self, t: Tensor):
        return self.inner.route(t)

    def _capture(self, key, x: Tensor, t: Tensor, y: Optional[Tensor], route: str):
        xs, ts = x.clone(), t.clone()
        ys = None if y is None else y.clone()
        host = host_time(t)
        if host is not None:  # the static time buffer stands for the same step: same route
            bind_host_time(ts, host)
        call = self.inner
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), inputs_validated(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                call(xs, ts, ys)
        torch.cuda.current_stream(x.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), inputs_validated(), torch.cuda.graph(g, pool=graph_pool(x.device)):
            out = call(xs, ts, ys)
        return g, xs, ts, ys, out

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if not (x.is_cuda and torch.cuda.is_available()) or torch.cuda.is_current_stream_capturing():
            return self.inner(x, t, y)
        route = self._route(t)
        if route is None:
            return self.inner(x, t, y)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, y is not None, route, str(x.device))
        if key not in self.graphs and key not in self.failed:
            try:
                self.graphs[key] = self._capture(key, x, t, y, route)
            except Exception as exc:  # noqa: BLE001
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture of the denoiser failed ({self.failed[key]}); calling it directly",
                              RuntimeWarning, stacklevel=2)
        if key in self.failed:
            return self.inner(x, t, y)
        g, xs, ts, ys, out = self.graphs[key]
        xs.copy_(x)
        ts.copy_(t)
        if ys is not None:
            ys.copy_(y)
        g.replay()
        return out.clone()
