"""CUDA-graph-captured sampling: the whole fixed-step loop (or each denoiser call) as a graph.

:class:`GraphSampler` captures, per (solver settings, batch bucket, sample shape, dtype, device,
conditional or not), the complete sampling loop -- starting noise, every denoiser evaluation
(DuoDiff's switch between its two backbones, ASE's kept blocks and multistage's stage included, also
under classifier-free guidance: the routing of each step is decided on the host while capturing,
from the step's time), every solver update -- into one
``torch.cuda.CUDAGraph``. A call writes new seeds and labels into the graph's static buffers and
replays it: no recapture. A DiT's DDPM and DDIM (the improved-DDPM loop: learned variance,
respaced steps, guidance on the first 3 channels) are captured the same way. Noise is Philox (:class:`~duodiff_fast.samplers.philox.PhiloxNoise`),
a pure function of (seed, step, element), so the replay draws each sample's own noise and padding a
batch up to a bucket does not change the real rows. All graphs of a device share one memory pool.

A capture failure (an op that cannot be recorded: a host read, an unrecorded constant) logs one
warning per key that names the op, and that key runs the plain loop instead -- which is also what
runs on a CPU. Any other error (a kernel that fails to compile or launch, bad shapes) propagates:
it would fail the plain loop too. Capture runs on the sampler's device (its CUDA device is made
current and the graph is recorded on a side stream of that device), so ``cuda:1`` captures on GPU 1.
The static buffers are ordinary tensors whether the first call ran under ``torch.inference_mode``
or not, so later calls work in either mode. Both give the same images as
``sample(..., noise="philox", fused=True)`` with the same seeds.

:class:`GraphDenoiser` is the per-step variant: it captures ``denoiser(x, t, y)`` (one graph per
backbone route) for solvers whose loop stays in Python.
"""
from __future__ import annotations

import contextlib
import dataclasses
import linecache
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..profiling import nvtx_range
from ..validation import inputs_validated
from ..samplers.constants import (ConstantTable, GraphUnsafe, bind_host_time, host_time, static_constants,
                                  table_active)

__all__ = ["GraphKey", "GraphSampler", "GraphDenoiser", "choose_bucket", "graph_pool", "HostRoutedDenoiser",
           "capture_failure", "on_device", "static_buffer"]

_POOLS: Dict[str, object] = {}
_CAPTURE_STREAMS: Dict[str, object] = {}

# Text of the errors CUDA and PyTorch raise for work that cannot be recorded in a graph (a
# synchronising call, a host-to-device copy, a blocked allocator or RNG call during capture).
_CAPTURE_MARKERS = ("captur", "cudaerrorstreamcapture", "not permitted when stream is")
_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_HERE)


@contextlib.contextmanager
def on_device(device) -> Iterator[None]:
    """Make ``device`` current (CUDA) for the block: streams, graphs, pools and Triton launches made
    inside belong to it, not to GPU 0. A no-op for a CPU device."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


def capture_stream(device) -> "torch.cuda.Stream":
    """The side stream graphs of ``device`` are recorded on (one per device, kept: ``torch.cuda.graph``'s
    own default capture stream is created once, on whichever device was current at its first use)."""
    key = str(torch.device(device))
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(torch.device(device))
    return _CAPTURE_STREAMS[key]


def static_buffer(make: Callable[[], Tensor]) -> Tensor:
    """A graph's static input/output buffer, made outside ``inference_mode``.

    A tensor made under ``torch.inference_mode`` is an inference tensor, which cannot be written in
    place outside that mode: a buffer made while the first call ran under inference_mode would make
    every later plain call fail on ``copy_``. Ordinary tensors may be written in either mode.
    """
    with torch.inference_mode(False):
        return make()


def denoiser_device(denoiser, depth: int = 4) -> Optional[torch.device]:
    """The device of the first parameter of the model a denoiser wraps (through ``model``,
    ``full``, ``denoiser`` and ``inner`` attributes: ModelDenoiser, DuoDiff, guidance, routing
    wrappers), or None when there is none (a plain function)."""
    if isinstance(denoiser, torch.nn.Module):
        p = next(denoiser.parameters(), None)
        if p is not None:
            return p.device
    if depth == 0:
        return None
    for name in ("model", "full", "denoiser", "inner"):
        inner = getattr(denoiser, "__dict__", {}).get(name)
        if inner is not None and inner is not denoiser:
            found = denoiser_device(inner, depth - 1)
            if found is not None:
                return found
    return None


def has_stateful_steps(denoiser, depth: int = 4) -> bool:
    """Whether calling ``denoiser`` advances state kept on the host (a caching denoiser's step and
    caches: ``stateful_steps``), also through wrappers (``denoiser``/``inner`` attributes: guidance,
    routing wrappers). Such calls are not replayed from a per-call graph."""
    if getattr(type(denoiser), "stateful_steps", False):
        return True
    if depth == 0:
        return False
    for name in ("denoiser", "inner"):
        inner = getattr(denoiser, "__dict__", {}).get(name)
        if inner is not None and inner is not denoiser and has_stateful_steps(inner, depth - 1):
            return True
    return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _where(exc: BaseException) -> str:
    """The innermost line of this package (outside the graph runtime) the error went through:
    ``methods/ase.py:120 in route: int(keep.min())``; the op that broke the capture."""
    found = None
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            path = os.path.abspath(tb.tb_frame.f_code.co_filename)
            if path.startswith(_PACKAGE) and not path.startswith(_HERE):
                found = (path, tb.tb_lineno, tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        if found is not None:
            break
    if found is None:
        return "an op outside the package"
    path, line, fn = found
    code = linecache.getline(path, line).strip()
    return f"{os.path.relpath(path, os.path.dirname(_PACKAGE))}:{line} in {fn}: {code}"


def capture_failure(exc: BaseException) -> Optional[str]:
    """Why ``exc`` is a CUDA-graph capture failure (the op that cannot be recorded, and the error),
    or None when it is a real error that must propagate.

    A capture failure is :class:`~duodiff_fast.samplers.constants.GraphUnsafe` (a step constant the
    warm-up did not record) or an error whose text (or its cause's) says the stream was capturing:
    a host read or a blocked call during capture. Anything else -- a Triton kernel that does not
    compile or launch, a shape error -- would fail outside a graph too, and is not one.
    """
    for e in _chain(exc):
        if isinstance(e, GraphUnsafe) or any(m in str(e).lower() for m in _CAPTURE_MARKERS):
            return f"{_where(exc)} ({type(exc).__name__}: {exc})"
    return None


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

    def routed_output(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The inner denoiser's whole network output (DiT: eps and the variance value, 2C channels).
        (Not named ``output``: ``output`` itself stays the inner's, absent where it has none.)"""
        route = self.route(t)
        if route is None:
            return self.inner.output(x, t, y)
        with nvtx_range(f"route {route} output"):
            return self.inner.output(x, t, y)


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
            variance, predict_x0, t_end, clip_denoised, thresholding, thresholding_ratio,
            thresholding_max_value): as :func:`duodiff_fast.samplers.sample`.
        device, dtype: where and in which dtype to sample.
        buckets: batch sizes to capture; a call with B samples replays the smallest bucket >= B
            (extra rows are padding, dropped). None: capture each batch size exactly.
        warmup: eager runs before capture (they also record the step constants).

    ``sampler(seeds, y=None)`` -> (B, C, H, W) samples, equal to
    ``sample(denoiser, schedule, (B, C, H, W), seeds=seeds, y=y, noise="philox", fused=fused, ...)``
    with ``fused`` True except for a DiT's DDPM/DDIM (:attr:`fused`): its improved-DDPM loop
    (learned variance, respaced steps, guidance on the first 3 channels) is captured as PyTorch ops.
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
        model_device = denoiser_device(denoiser)
        if model_device is not None and normalize_device(model_device) != self.device:
            raise ValueError(f"the denoiser's model is on {model_device} but the sampler on {self.device}: "
                             "graphs are captured on the model's device; pass device=" + str(model_device))
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
                      progress=False, noise="philox", fused=self.fused, **self.options)

    @property
    def fused(self) -> bool:
        """Whether the loop uses the fused solver update: every solver but DiT's improved-DDPM
        DDPM/DDIM (learned variance), which has none and runs its update in PyTorch ops."""
        improved = self.solver in ("ddpm", "ddim") and getattr(self.denoiser, "uses_improved_ddpm", False)
        return not improved

    def uses_graphs(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def key(self, batch: int, conditional: bool) -> GraphKey:
        return GraphKey.make(self.solver, {"num_steps": self.num_steps, **self.options}, batch, self.sample_shape,
                             self.dtype, self.device, conditional, self.denoiser)

    # ---- capture ---------------------------------------------------------------------------------
    def _body(self, seeds: Tensor, y: Optional[Tensor]) -> Tensor:
        """The sampling loop on static buffers (run eagerly for warm-up, then under capture)."""
        from ..samplers.denoised import denoised_correction
        from ..samplers.driver import _build
        from ..samplers.philox import PhiloxNoise

        o = self.options
        run, _ = _build(self.solver, self.denoiser, self.schedule, self.num_steps,
                        o.get("eta", 0.0), o.get("order"), o.get("variance", "beta"), o.get("spacing"),
                        o.get("method"), o.get("skip_type"), o.get("predict_x0"),
                        o.get("t_end"), self.fused, denoised_correction(
                            o.get("clip_denoised", False), o.get("thresholding", False),
                            o.get("thresholding_ratio", 0.995), o.get("thresholding_max_value", 1.0)))
        noise = PhiloxNoise(seeds, device=self.device, dtype=self.dtype)
        x_T = noise.initial((seeds.shape[0], *self.sample_shape))
        return run(x_T, y, noise, None)

    def capture(self, key: GraphKey) -> _Captured:
        """Warm up and capture the loop for ``key`` on the sampler's device (raises on any error)."""
        dev = self.device
        seeds = static_buffer(lambda: torch.zeros(key.batch, dtype=torch.int64, device=dev))
        y = static_buffer(lambda: torch.zeros(key.batch, dtype=torch.long, device=dev)) if key.conditional else None
        table = ConstantTable()
        # Ordinary tensors throughout (also the output and the recorded constants), whichever mode
        # the caller is in: see static_buffer.
        with on_device(dev), torch.inference_mode(False), torch.no_grad():
            check = getattr(self.denoiser, "check", None)
            if check is not None:  # shape/label checks once, eagerly (the loop runs with values trusted)
                check(torch.zeros((key.batch, *self.sample_shape), device=dev, dtype=self.dtype),
                      torch.full((key.batch,), self.schedule.t_max, dtype=torch.float64, device=dev), y)
        with on_device(dev), torch.inference_mode(False), torch.no_grad(), inputs_validated():
            side = capture_stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    with static_constants(table, recording=True):
                        self._body(seeds, y)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with static_constants(table, recording=False):
                with torch.cuda.graph(graph, pool=graph_pool(dev), stream=side):
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
            except Exception as exc:
                why = capture_failure(exc)
                if why is None:  # a real error (a kernel, a shape): the plain loop would fail too
                    raise
                self.failed[key] = why
                warnings.warn(f"CUDA graph capture failed for {key} at {why}; running the plain loop",
                              RuntimeWarning, stacklevel=2)
        if entry is None:
            return self.plain(seeds, y)
        with nvtx_range(f"graph replay {self.solver} B={bucket}"), on_device(self.device):
            fill_static_inputs(entry, seed_t, y)
            entry.graph.replay()
            return entry.out[:B].clone()


def fill_static_inputs(entry: _Captured, seed_t: Tensor, y: Optional[Tensor]) -> None:
    """Write a call's (B,) seeds and labels into a graph's static buffers (rows past B: zero padding).

    The buffers are ordinary tensors (:func:`static_buffer`), so this works under
    ``torch.inference_mode`` and outside it alike.
    """
    B = int(seed_t.shape[0])
    entry.seeds.zero_()
    entry.seeds[:B].copy_(seed_t, non_blocking=True)
    if entry.y is not None:
        entry.y.zero_()
        entry.y[:B].copy_(y.reshape(-1).to(torch.long), non_blocking=True)


class GraphDenoiser:
    """``denoiser(x, t, y)`` replayed from CUDA graphs, one per (batch, shape, dtype, route).

    For solvers whose loop stays in Python: each call copies x, t (and y) into static buffers,
    replays and returns a copy of the output. :meth:`output` (the whole network output, which DiT's
    improved-DDPM samplers call: eps and the learned variance value, (B, 2C, H, W)) is captured the
    same way, in graphs of its own; ``__call__`` captures the denoiser's call (for the package's
    denoisers the first C channels of that output). Routed denoisers (DuoDiff, ASE, multistage, CFG around
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

    def _capture(self, key, x: Tensor, t: Tensor, y: Optional[Tensor], route: str, call: Callable):
        dev = x.device
        # Static buffers are ordinary tensors whichever mode this first call runs in (static_buffer).
        xs, ts = static_buffer(x.clone), static_buffer(t.clone)
        ys = None if y is None else static_buffer(y.clone)
        host = host_time(t)
        if host is not None:  # the static time buffer stands for the same step: same route
            bind_host_time(ts, host)
        with on_device(dev), torch.inference_mode(False), torch.no_grad(), inputs_validated():
            side = capture_stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    call(xs, ts, ys)
            torch.cuda.current_stream(dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=graph_pool(dev), stream=side):
                out = call(xs, ts, ys)
        return g, xs, ts, ys, out

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The denoiser's call (eps, (B, C, H, W)), replayed from a graph where one is captured."""
        return self._replayed("call", self.inner, x, t, y)

    @property
    def output(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        """``output(x, t, y)``: the denoiser's whole output (B, C_out, H, W), replayed from graphs of its
        own. An AttributeError where the denoiser has none, so ``getattr(gd, "output", None)`` (how the
        improved-DDPM sampler asks) still says None there."""
        if not callable(getattr(self.inner.inner, "output", None)):
            raise AttributeError(f"{type(self.inner.inner).__name__} has no output(x, t, y)")
        return self._output

    def _output(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self._replayed("output", self.inner.routed_output, x, t, y)

    def _replayed(self, kind: str, call: Callable, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        if not (x.is_cuda and torch.cuda.is_available()) or torch.cuda.is_current_stream_capturing():
            return call(x, t, y)
        if has_stateful_steps(self.inner.inner):
            # A call that advances state on the host (a caching denoiser's step and caches) cannot
            # be replayed from a per-call graph: it captures its own steps (runtime.cache_graphs).
            return call(x, t, y)
        if not table_active():
            # Outside static_constants the plain loop's time vectors remember their host time
            # (samplers.constants.time_vector), but the constants a routed call makes from it are
            # not recorded for capture: hide it (a new view, no copy) and route as before.
            t = t.view_as(t)
        route = self._route(t)
        if route is None:
            return call(x, t, y)
        key = (kind, tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, y is not None, route, str(x.device))
        if key not in self.graphs and key not in self.failed:
            try:
                self.graphs[key] = self._capture(key, x, t, y, route, call)
            except Exception as exc:
                why = capture_failure(exc)
                if why is None:  # a real error: calling the denoiser directly would fail too
                    raise
                self.failed[key] = why
                warnings.warn(f"CUDA graph capture of the denoiser failed at {why}; calling it directly",
                              RuntimeWarning, stacklevel=2)
        if key in self.failed:
            return call(x, t, y)
        g, xs, ts, ys, out = self.graphs[key]
        with on_device(x.device):
            xs.copy_(x)
            ts.copy_(t)
            if ys is not None:
                ys.copy_(y)
            g.replay()
            return out.clone()
