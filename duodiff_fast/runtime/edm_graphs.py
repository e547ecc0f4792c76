"""EDM's Heun sampler on CUDA graphs, for EDM's DDPM++ U-Net and the multistage U-Net.

:class:`EDMGraphSampler` runs Karras et al.'s Algorithm 2 (2N - 1 evaluations; the state kept in
float64 between evaluations, the denoiser seeing it cast to float32 by its preconditioning) on
static buffers and captures it into ``torch.cuda.CUDAGraph`` s, per (batch bucket, conditional or
not):

* ``mode="whole"``: the whole loop, every evaluation and update, is one graph.
* ``mode="step"``: one graph per Heun step (its Euler evaluation, its correction and the update);
  the steps share one static state buffer and are replayed in order.

Everything a step needs is fixed before capture: the sigma grid (clipped to the net's own
``sigma_min``/``sigma_max`` as :func:`~duodiff_fast.edm.sampler.heun_sample` does) lives on the
device, and a multistage net's stage for each evaluation is chosen on the host from that
evaluation's noise level -- exactly as the net would choose it from its c_noise -- and passed as
``stage=``, so a graph holds one decoder per evaluation and reads nothing back from the device.
Class labels enter as one-hot rows of a static buffer. Churn (``S_churn > 0``) is supported: the
fresh noise of the churned steps is drawn before a replay with the caller's ``randn_like`` (in the
same order :func:`heun_sample` draws it) into a static buffer; with the default (no churn) none is drawn.

On a CPU, or when capture fails (one warning naming the op, see
:func:`~duodiff_fast.runtime.graphs.capture_failure`), the same loop runs eagerly on the same
buffers. Results equal ``heun_sample(net, latents, config, class_labels, randn_like)``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..edm.sampler import HeunConfig, sigma_grid
from ..edm.unet import MultistageUNet
from ..profiling import nvtx_range
from .graphs import capture_failure, capture_stream, choose_bucket, graph_pool, on_device, static_buffer

__all__ = ["EDMGraphSampler", "MODES", "heun_plan"]

MODES = ("whole", "step")


def _stage_of(net, sigma: float) -> Optional[int]:
    """The decoder a multistage net runs at noise level ``sigma`` (None for a single U-Net): the net's
    own rule applied to the c_noise its preconditioning computes for a float32 sigma."""
    model = net.model
    if not isinstance(model, MultistageUNet):
        return None
    s = torch.tensor([[[[sigma]]]], dtype=torch.float32)
    c_noise = net.coefficients(s)[3]
    return model.stage_of(torch.as_tensor(c_noise, dtype=torch.float32).reshape(-1))


def heun_plan(net, config: HeunConfig) -> Tuple[Tensor, List[float], List[dict]]:
    """The host-side plan of a Heun run: (grid (N+1,) float64 on the CPU, gamma per step, evaluations).

    Each evaluation is ``{"step": i, "kind": "euler"|"correction", "sigma": float, "stage": int|None}``
    (2N - 1 of them); ``stage`` is the multistage decoder that evaluation runs."""
    smin = max(config.sigma_min, float(getattr(net, "sigma_min", 0.0)))
    smax = min(config.sigma_max, float(getattr(net, "sigma_max", math.inf)))
    grid = sigma_grid(config.num_steps, smin, smax, config.rho)
    n = config.num_steps
    gammas, evals = [], []
    for i in range(n):
        t_cur = float(grid[i])
        gamma = min(config.S_churn / n, math.sqrt(2) - 1) if config.S_min <= t_cur <= config.S_max else 0.0
        gammas.append(gamma)
        t_hat = float(grid[i] + gamma * grid[i])
        evals.append({"step": i, "kind": "euler", "sigma": t_hat, "stage": _stage_of(net, t_hat)})
        if i < n - 1:
            t_next = float(grid[i + 1])
            evals.append({"step": i, "kind": "correction", "sigma": t_next, "stage": _stage_of(net, t_next)})
    return grid, gammas, evals


class _Buffers:
    """Static buffers of one batch bucket: latents and state (float64), one-hot labels, churn noise."""

    def __init__(self, bucket: int, shape, label_dim: Optional[int], n_churn: int, device):
        make = lambda *s, dtype=torch.float64: static_buffer(lambda: torch.zeros(*s, dtype=dtype, device=device))  # noqa: E731
        self.latents = make(bucket, *shape)
        self.state = make(bucket, *shape)
        self.labels = None if label_dim is None else make(bucket, label_dim, dtype=torch.float32)
        self.churn = make(n_churn, bucket, *shape) if n_churn else None
        self.graphs: List["torch.cuda.CUDAGraph"] = []


class EDMGraphSampler:
    """Heun sampling of an EDM preconditioned net with the loop captured in CUDA graphs.

    Args:
        net: an EDM preconditioned net (EDMPrecond/VPPrecond/VEPrecond around SongUNet or
            MultistageUNet), prepared for inference (:func:`~duodiff_fast.edm.backends.prepare_edm_net`).
        config: Heun settings (grid, churn).
        mode: "whole" (one graph for the loop) or "step" (one graph per Heun step).
        buckets: batch sizes to capture; a call with B samples runs the smallest bucket >= B (extra
            rows are zero padding, dropped; every row is computed independently). None: exact sizes.
        warmup: eager runs on the static buffers before capture.

    ``sampler(latents, class_labels=None, randn_like=torch.randn_like)`` -> x_0 (B, C, H, W) float64,
    equal to :func:`~duodiff_fast.edm.sampler.heun_sample` with the same arguments.
    """

    def __init__(self, net, config: HeunConfig = HeunConfig(), *, mode: str = "whole",
                 buckets: Optional[Sequence[int]] = None, warmup: int = 1):
        from ..edm.precond import _Precond

        if not isinstance(net, _Precond):
            raise TypeError(f"expected an EDM preconditioned net (EDMPrecond, VPPrecond, VEPrecond), got {type(net).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(config, HeunConfig):
            raise TypeError(f"config must be a HeunConfig, got {type(config).__name__}")
        self.net, self.config, self.mode = net, config, mode
        self.buckets = tuple(int(b) for b in buckets) if buckets else None
        self.warmup = max(1, int(warmup))
        self.device = next(net.parameters()).device
        self.shape = (net.img_channels, net.img_resolution, net.img_resolution)
        grid, self.gammas, self.evals = heun_plan(net, config)
        n = config.num_steps
        # The grid and t_hat on the device, made once (the graphs read them; nothing is copied from the host).
        self.t_steps = static_buffer(lambda: grid.to(self.device))
        self.t_hat = [self.t_steps[i] + self.gammas[i] * self.t_steps[i] for i in range(n)]
        self.churn_steps = [i for i in range(n) if self.gammas[i] > 0]
        self.stages = {(e["step"], e["kind"]): e["stage"] for e in self.evals}
        self.buffers: Dict[Tuple[int, bool], _Buffers] = {}
        self.failed: Dict[Tuple[int, bool], str] = {}

    # ---- the loop on static buffers -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor, labels: Optional[Tensor], stage: Optional[int]) -> Tensor:
        kwargs = {} if stage is None else {"stage": stage}
        return self.net(x, sigma, labels, **kwargs).to(torch.float64)

    def _step(self, buf: _Buffers, i: int) -> None:
        """Heun step i on ``buf.state`` in place (the same arithmetic as heun_sample)."""
        n = self.config.num_steps
        x_cur = buf.state
        t_cur, t_next, t_hat = self.t_steps[i], self.t_steps[i + 1], self.t_hat[i]
        x_hat = x_cur
        if self.gammas[i] > 0:
            noise = buf.churn[self.churn_steps.index(i)]
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * self.config.S_noise * noise
        denoised = self._denoise(x_hat, t_hat, buf.labels, self.stages[(i, "euler")])
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            denoised = self._denoise(x_next, t_next, buf.labels, self.stages[(i, "correction")])
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        buf.state.copy_(x_next)

    def _start(self, buf: _Buffers) -> None:
        buf.state.copy_(buf.latents * self.t_steps[0])

    def _whole(self, buf: _Buffers) -> None:
        self._start(buf)
        for i in range(self.config.num_steps):
            self._step(buf, i)

    def _run_eager(self, buf: _Buffers) -> None:
        self._whole(buf)

    # ---- capture -------------------------------------------------------------------------------
    def uses_graphs(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def _bodies(self, buf: _Buffers) -> List[Callable[[], None]]:
        if self.mode == "whole":
            return [lambda: self._whole(buf)]
        return [(lambda i=i: self._step(buf, i)) for i in range(self.config.num_steps)]

    def _capture(self, buf: _Buffers) -> None:
        dev = self.device
        graphs = []
        with on_device(dev), torch.inference_mode(False), torch.no_grad():
            side = capture_stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._whole(buf)
            torch.cuda.current_stream(dev).wait_stream(side)
            for body in self._bodies(buf):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=graph_pool(dev), stream=side):
                    body()
                graphs.append(g)
        buf.graphs = graphs

    def _replay(self, buf: _Buffers) -> None:
        with on_device(self.device):
            if self.mode == "step":
                self._start(buf)
            for g in buf.graphs:
                g.replay()

    # ---- sampling ------------------------------------------------------------------------------
    def _fill(self, buf: _Buffers, latents: Tensor, class_labels: Optional[Tensor],
              randn_like: Callable[[Tensor], Tensor]) -> None:
        B = latents.shape[0]
        buf.latents.zero_()
        buf.latents[:B].copy_(latents)
        if buf.labels is not None:
            buf.labels.zero_()
            labels = class_labels
            if not labels.is_floating_point():
                labels = torch.nn.functional.one_hot(labels.long().reshape(-1), self.net.label_dim)
            labels = labels.to(torch.float32).reshape(-1, self.net.label_dim)
            buf.labels[:B].copy_(labels.expand(B, -1) if labels.shape[0] == 1 else labels)
        if buf.churn is not None:
            buf.churn.zero_()
            like = torch.empty((B, *self.shape), dtype=torch.float64, device=self.device)
            for k in range(len(self.churn_steps)):  # in step order, as heun_sample draws them
                buf.churn[k, :B].copy_(randn_like(like))

    def _check(self, latents: Tensor, class_labels: Optional[Tensor]) -> None:
        if not isinstance(latents, Tensor) or latents.dim() != 4 or not latents.is_floating_point():
            raise ValueError(f"latents must be a float (B, C, H, W) tensor, got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"latents must be (B, {', '.join(map(str, self.shape))}) for this net, got {tuple(latents.shape)}")
        if latents.device != self.device:
            raise ValueError(f"latents are on {latents.device}, the net on {self.device}")
        if class_labels is not None:
            if not self.net.label_dim:
                raise ValueError("class_labels given to an unconditional net")
            n = class_labels.shape[0] if class_labels.dim() else 1
            if n not in (1, latents.shape[0]):
                raise ValueError(f"class_labels must hold 1 or {latents.shape[0]} rows, got {n}")
            if not class_labels.is_floating_point() and class_labels.numel() and (
                    int(class_labels.min()) < 0 or int(class_labels.max()) >= self.net.label_dim):
                raise ValueError(f"class ids must lie in [0, {self.net.label_dim - 1}]")

    def __call__(self, latents: Tensor, class_labels: Optional[Tensor] = None,
                 randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
        return self.sample(latents, class_labels, randn_like)

    def sample(self, latents: Tensor, class_labels: Optional[Tensor] = None,
               randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
        """x_0 (B, C, H, W) float64 from unit Gaussian ``latents`` (B, C, H, W) (scaled by sigma_max here)."""
        self._check(latents, class_labels)
        B = int(latents.shape[0])
        conditional = bool(self.net.label_dim)
        bucket = choose_bucket(B, self.buckets)
        key = (bucket, conditional)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = _Buffers(bucket, self.shape, self.net.label_dim if conditional else None,
                                               len(self.churn_steps), self.device)
        with torch.inference_mode(False), torch.no_grad():
            self._fill(buf, latents, class_labels, randn_like)
            if self.uses_graphs() and not buf.graphs and key not in self.failed:
                try:
                    self._capture(buf)
                except Exception as exc:
                    why = capture_failure(exc)
                    if why is None:  # a real error: the eager loop would fail too
                        raise
                    self.failed[key] = why
                    buf.graphs = []
                    warnings.warn(f"CUDA graph capture of the EDM Heun loop failed for batch {bucket} at {why}; "
                                  "running it eagerly", RuntimeWarning, stacklevel=2)
            if buf.graphs:
                with nvtx_range(f"edm heun graph replay {self.mode} B={bucket}"):
                    self._replay(buf)
            else:
                self._run_eager(buf)
            return buf.state[:B].clone()
