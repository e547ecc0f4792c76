"""Training-free feature caching on U-ViT: DeepCache-style skip caching, FORA-style block caching and
Learning-to-Cache routers, as denoisers the solvers call.

All three run the U-ViT's own modules layer by layer (:func:`run_uvit`: embed -> in-blocks ->
mid-block -> out-blocks with the long skips -> final layer) and decide per network evaluation
("step" k = 0, 1, ... of one sampling trajectory) what to recompute:

* :class:`DeepCachePolicy` (DeepCache, Ma et al. 2024, with U-ViT's long skips in the U-Net's role):
  step k is a full step when ``k % interval == 0``; it stores the input of out-block ``n - depth``
  (the output of the inner layers). A cache step runs only the outer ``depth`` in-blocks and their
  ``depth`` out-blocks and takes the inner output from the cache. The paper's non-uniform 1:N
  strategy (:func:`nonuniform_full_steps`) instead spreads the same number of full steps densely
  around a centre step, where the features change fastest.
* :class:`BlockCachePolicy` (FORA, Selvaraju et al. 2024): on full steps (``k % interval == 0``)
  every chosen layer stores its attention and MLP branch outputs; on the other steps those layers add
  the stored outputs instead of computing them.
* :class:`RouterPolicy` (Learning-to-Cache, Ma et al. 2024): a router file holds per step k a logit
  per attention and per MLP of every layer (index 2 i: attention of layer i, 2 i + 1: its MLP; layers
  numbered in-blocks, mid-block, out-blocks). Step 0 computes everything; at step k > 0 a branch whose
  sigmoid(logit) exceeds the threshold is recomputed, the others reuse their output of step k - 1.

On a DiT the same policies run the DiT blocks (:mod:`duodiff_fast.methods.caching_dit`, dispatched on
the model type): FORA and Learning-to-Cache reuse the branch outputs before the adaLN gate; DeepCache is
refused (DiT has no long skips).

A trajectory starts when the time does not decrease from the previous call (or the batch size
changes): the caches are then cleared and k restarts at 0. The caching denoiser composes with DuoDiff:
the shallow backbone serves the noisiest steps uncached and the caching runs in the full phase
(k counts the full backbone's evaluations).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..samplers.constants import host_time
from .duodiff import DuoDiff

__all__ = ["run_uvit", "nonuniform_full_steps", "DeepCachePolicy", "BlockCachePolicy", "RouterPolicy", "CachingDenoiser",
           "load_router", "CACHING_BACKENDS"]

# The caching forward runs the model's nn.Modules eagerly; fused / compiled forwards are not hooked.
CACHING_BACKENDS = ("reference", "eager-bf16")

BlockFn = Callable[[int, torch.nn.Module, Tensor], Tensor]


def _check_uvit(model) -> None:
    from .caching_dit import is_dit

    if is_dit(model):  # the DiT forms live in caching_dit / tome (dispatched on the model type)
        return
    for attr in ("in_blocks", "mid_block", "out_blocks", "embed", "decode"):
        if not hasattr(model, attr):
            raise TypeError(f"caching methods need a U-ViT (in_blocks, mid_block, out_blocks, embed, decode); "
                            f"{type(model).__name__} has no {attr!r}")


def plain_block(i: int, blk, h: Tensor) -> Tensor:
    """Block i's attention and MLP branches (the U-ViT's own ``transform``)."""
    return blk.transform(h)


def run_uvit(model, x: Tensor, timesteps: Tensor, y: Optional[Tensor], block_fn: BlockFn = plain_block,
             start: int = 0, h: Optional[Tensor] = None, skips: Optional[List[Tensor]] = None,
             stop: Optional[int] = None, on_layer: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
    """The U-ViT forward written out layer by layer with ``block_fn`` for each layer's branches.

    x (B, C, H, W), timesteps (B,) network input, y (B,) or None -> eps (B, C, H, W); with ``stop``
    the (B, N, D) tokens entering layer ``stop`` instead. ``start``/``h``/``skips`` resume at layer
    ``start`` with those tokens and pending skips (DeepCache's cache steps). ``on_layer(i, h)`` sees
    the tokens entering layer i.
    """
    n_in = len(model.in_blocks)
    layers = model.layers()
    if h is None:
        h = model.embed(x, timesteps, y)
        skips = []
    skips = list(skips or [])
    for i in range(start, len(layers)):
        if stop is not None and i == stop:
            return h
        blk = layers[i]
        if i > n_in:
            h = blk.merge_skip(h, skips.pop())
        if on_layer is not None:
            on_layer(i, h)
        h = block_fn(i, blk, h)
        if i < n_in:
            skips.append(h)
    return model.decode(h)


class _Policy:
    """What one trajectory step recomputes; subclasses keep their caches between steps.

    Step graphs (:mod:`duodiff_fast.runtime.cache_graphs`): :meth:`pattern` names what a step
    computes, known on the host before it runs, so one CUDA graph serves every step of a pattern.
    With ``static`` set the caches are buffers written in place (:meth:`_keep`) that survive
    :meth:`reset` (a new trajectory only marks them stale), so every graph reads and writes the
    same memory; :meth:`mark` updates the host's record of fresh caches after a replay.
    """

    name = "policy"
    static = False

    def reset(self) -> None:
        pass

    def pattern(self, model, step: int) -> Optional[tuple]:
        """What ``step`` computes as a hashable key (one graph per key), or None: not capturable."""
        return None

    def mark(self, model, pattern: tuple) -> None:
        """Record on the host the caches a step of ``pattern`` leaves fresh (a replay runs no Python)."""

    def _keep(self, store: Dict, key, value: Tensor) -> Tensor:
        """``store[key] = value``; with ``static``, copied into the key's buffer (made on first use,
        outside any capture: a buffer first needed while capturing is a capture failure)."""
        if not self.static:
            store[key] = value
            return value
        buf = store.get(key)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            if value.is_cuda and torch.cuda.is_current_stream_capturing():
                from ..samplers.constants import GraphUnsafe

                raise GraphUnsafe(f"{self.name} cache buffer {key!r} was not made by the warm-up run")
            from ..runtime.graphs import static_buffer

            buf = store[key] = static_buffer(lambda: torch.empty_like(value))
        buf.copy_(value)
        return buf

    def forward(self, model, x: Tensor, timesteps: Tensor, y: Optional[Tensor], step: int) -> Tensor:
        raise NotImplementedError

    def details(self) -> Dict[str, object]:
        return {}


def _check_interval(interval) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    return interval


def nonuniform_full_steps(num_steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> List[int]:
    """DeepCache's non-uniform 1:N choice of full steps among steps 0..S-1 (S = ``num_steps``).

    As many full steps as the uniform 1:N strategy, K = ceil(S / N), but placed along a power curve
    centred on step c = round(center * (S - 1)): with u_0 .. u_{K-1} evenly spaced from -c^(1/p) to
    (S - 1 - c)^(1/p), full step j is c + sign(u_j) |u_j|^p rounded to the nearest step (halves up).
    For p > 1 the curve is flat at c, so full steps crowd around c (where the paper finds the
    features change fastest) and thin out towards both ends; steps 0 and S - 1 are always full.
    Where rounding merges two steps, p is lowered by 0.05 (p = 1 is the evenly spaced choice, whose
    K steps are distinct) until K distinct steps remain. -> sorted list of the K full steps.

    Args:
        num_steps: S >= 1, the full-backbone evaluations of one trajectory.
        interval: N >= 1. center: c / (S - 1) in [0, 1]. power: p >= 1.
    """
    import math

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"deepcache non-uniform steps need the trajectory's step count (an int >= 1), got {num_steps!r}")
    _check_interval(interval)
    if isinstance(center, bool) or not isinstance(center, (int, float)) or not 0 <= center <= 1:
        raise ValueError(f"deepcache center must lie in [0, 1] (a fraction of the trajectory), got {center!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or power < 1:
        raise ValueError(f"deepcache power must be >= 1, got {power!r}")
    S, K = num_steps, -(-num_steps // interval)
    if K == 1:
        return [0]
    if K == S:  # 1:1, every step full
        return list(range(S))
    c = math.floor(center * (S - 1) + 0.5)
    p = float(power)
    while True:
        lo, hi = -(c ** (1 / p)), (S - 1 - c) ** (1 / p)
        steps = set()
        for j in range(K):
            u = lo + (hi - lo) * j / (K - 1)
            v = c + math.copysign(abs(u) ** p, u)
            steps.add(min(S - 1, max(0, math.floor(v + 0.5))))
        steps |= {0, S - 1}
        if len(steps) == K or p <= 1:
            break
        p = max(1.0, p - 0.05)
    if len(steps) != K:  # p = 1 spaces K <= S steps at least one apart; a float slip lands here
        raise AssertionError(f"non-uniform DeepCache chose {sorted(steps)} for S={S}, K={K}")
    return sorted(steps)


class DeepCachePolicy(_Policy):
    """Skip caching for U-ViT: full steps every ``interval`` steps, cache steps run the outer
    ``depth`` in/out-block pairs only.

    Args:
        interval: N; steps k with k % N == 0 are full steps (N = 1: no caching).
        depth: in/out-block pairs kept on cache steps, 1 <= depth <= number of in-blocks.
        num_steps: with it, the non-uniform strategy: the full steps are
            :func:`nonuniform_full_steps` (num_steps, interval, center, power), and a trajectory may
            not run past num_steps full-backbone evaluations.
    """

    name = "deepcache"

    def __init__(self, interval: int = 3, depth: int = 1, num_steps: Optional[int] = None, center: float = 0.3,
                 power: float = 1.4):
        self.interval = _check_interval(interval)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"deepcache depth (in/out-block pairs kept) must be an int >= 1, got {depth!r}")
        self.depth = depth
        self.num_steps, self.center, self.power = num_steps, center, power
        self.full_steps = (None if num_steps is None
                           else frozenset(nonuniform_full_steps(num_steps, interval, center, power)))
        self.reset()

    def reset(self) -> None:
        if not self.static or not hasattr(self, "_store"):
            self._store: Dict[str, Tensor] = {}
        self._fresh = False  # the cache holds this trajectory's inner output

    @property
    def inner(self) -> Optional[Tensor]:
        """(B, N, D) tokens entering out-block n - depth at the latest full step (None: none yet)."""
        return self._store.get("inner") if self._fresh else None

    def pattern(self, model, step):
        return ("full",) if self.is_full(step) else ("cache",)

    def mark(self, model, pattern):
        if pattern == ("full",):
            self._fresh = True

    def planned_full(self, step: int) -> bool:
        """Whether ``step`` is a full step by the schedule (uniform k % N == 0, or non-uniform)."""
        if self.full_steps is None:
            return step % self.interval == 0
        if step >= self.num_steps:
            raise ValueError(f"deepcache non-uniform steps were chosen for {self.num_steps} steps; this "
                             f"trajectory asked for step {step}")
        return step in self.full_steps

    def is_full(self, step: int) -> bool:
        return self.planned_full(step) or self.inner is None

    def forward(self, model, x, timesteps, y, step):
        _refuse_dit_deepcache(model)
        n_in = len(model.in_blocks)
        if self.depth > n_in:
            raise ValueError(f"deepcache depth {self.depth} exceeds the model's {n_in} in-blocks")
        layers = model.layers()
        resume = 2 * n_in + 1 - self.depth  # layer index of the first kept out-block
        full = self.is_full(step)
        h = model.embed(x, timesteps, y)
        skips: List[Tensor] = []
        for i in range(n_in if full else self.depth):
            h = layers[i].transform(h)
            skips.append(h)
        if full:
            h = layers[n_in].transform(h)
            for i in range(n_in + 1, resume):
                h = layers[i].transform(layers[i].merge_skip(h, skips.pop()))
            self._keep(self._store, "inner", h)  # tokens entering out-block n - depth (before its skip merge)
            self._fresh = True
        else:
            h = self.inner
        for i in range(resume, 2 * n_in + 1):
            h = layers[i].transform(layers[i].merge_skip(h, skips.pop()))
        return model.decode(h)

    def details(self):
        out = {"cache_interval": self.interval, "deepcache_depth": self.depth}
        if self.full_steps is not None:
            out.update(deepcache_schedule="nonuniform", deepcache_steps=self.num_steps,
                       deepcache_center=self.center, deepcache_power=self.power)
        return out


def _refuse_dit_deepcache(model) -> None:
    from .caching_dit import is_dit

    if is_dit(model):
        raise ValueError("deepcache caches the features behind U-ViT's long skips; DiT has no long skips: "
                         "use fora, l2c or tome on DiT")


class _BranchCache(_Policy):
    """Shared step of FORA and Learning-to-Cache: per layer, compute or reuse the attention and MLP
    branch outputs as :meth:`plan` says, keeping the latest of each."""

    def reset(self) -> None:
        if not self.static or not hasattr(self, "attn"):
            self.attn: Dict[int, Tensor] = {}
            self.mlp: Dict[int, Tensor] = {}
        self.fresh = set()  # ("attn" | "mlp", layer) holding this trajectory's output

    def pattern(self, model, step):
        """Per layer: (recompute attention, recompute MLP), stale caches counted as recomputed."""
        out = []
        for i in range(model.num_layers):
            do_attn, do_mlp = self.plan(step, i)
            out.append((bool(do_attn) or ("attn", i) not in self.fresh, bool(do_mlp) or ("mlp", i) not in self.fresh))
        return tuple(out)

    def mark(self, model, pattern):
        for i, (do_attn, do_mlp) in enumerate(pattern):
            if do_attn:
                self.fresh.add(("attn", i))
            if do_mlp:
                self.fresh.add(("mlp", i))

    def plan(self, step: int, layer: int):
        """(recompute attention, recompute MLP) of ``layer`` at ``step``."""
        raise NotImplementedError

    def forward(self, model, x, timesteps, y, step):
        from .caching_dit import dit_branch_cache_forward, is_dit

        if is_dit(model):
            return dit_branch_cache_forward(self, model, x, timesteps, y, step)

        def block(i, blk, h):
            do_attn, do_mlp = self.plan(step, i)
            if do_attn or ("attn", i) not in self.fresh:
                self._keep(self.attn, i, blk.attn(blk.norm1(h)))
                self.fresh.add(("attn", i))
            h = h + self.attn[i]
            if do_mlp or ("mlp", i) not in self.fresh:
                self._keep(self.mlp, i, blk.mlp(blk.norm2(h)))
                self.fresh.add(("mlp", i))
            return h + self.mlp[i]

        return run_uvit(model, x, timesteps, y, block)


class BlockCachePolicy(_BranchCache):
    """FORA-style block caching: layers in ``layers`` (None: all) reuse their attention and MLP outputs
    for ``interval - 1`` steps after each full step (k % interval == 0)."""

    name = "fora"

    def __init__(self, interval: int = 2, layers: Optional[Sequence[int]] = None):
        self.interval = _check_interval(interval)
        if layers is not None:
            layers = sorted({int(v) for v in layers})
            if not layers or layers[0] < 0:
                raise ValueError(f"fora layers must be non-negative layer indices, got {layers!r}")
        self.layers = layers
        self.reset()

    def plan(self, step, layer):
        cached = self.layers is None or layer in self.layers
        full = step % self.interval == 0 or not cached
        return full, full

    def details(self):
        return {"cache_interval": self.interval, "fora_layers": "all" if self.layers is None else list(self.layers)}


def load_router(path: str) -> Tensor:
    """Learning-to-Cache router logits from a state dict of ``"<step>.prob"`` tensors -> (S, 2 L) float.

    Read with ``weights_only=True``. A dict holding them under ``"routers"`` is read from that key (the
    published DiT router files hold them under ``"routers"`` beside an ``argparse.Namespace`` of the
    training arguments: weights-only loading accepts that one class and nothing else). The logits of
    a DiT are ordered as a U-ViT's: index 2 i attention of block i, 2 i + 1 its MLP.
    """
    from ..models.checkpoint import read_checkpoint_file

    sd = read_checkpoint_file(path)
    if isinstance(sd, dict) and "routers" in sd and isinstance(sd["routers"], dict):
        sd = sd["routers"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: a Learning-to-Cache router file is a state dict of '<step>.prob' tensors, "
                         f"got {type(sd).__name__}")
    steps = {}
    for key, value in sd.items():
        idx, _, leaf = str(key).partition(".")
        if leaf != "prob" or not idx.isdigit() or not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(f"{path}: unexpected router entry {key!r}; expected '<step>.prob' 1-D tensors")
        steps[int(idx)] = value.detach().float().cpu()
    if not steps or sorted(steps) != list(range(len(steps))):
        raise ValueError(f"{path}: router steps must be 0..S-1, got {sorted(steps)}")
    widths = {v.numel() for v in steps.values()}
    if len(widths) != 1 or next(iter(widths)) % 2:
        raise ValueError(f"{path}: every step needs the same even number of logits (2 per layer), got {sorted(widths)}")
    return torch.stack([steps[k] for k in range(len(steps))])


class RouterPolicy(_BranchCache):
    """Learning-to-Cache: at step k > 0, layer i recomputes its attention when
    sigmoid(logits[k, 2 i]) > threshold and its MLP when sigmoid(logits[k, 2 i + 1]) > threshold;
    otherwise it reuses the branch output of step k - 1. Step 0 computes everything.

    Args:
        logits: (S, 2 L) router logits (:func:`load_router`).
        threshold: in [0, 1].
    """

    name = "l2c"

    def __init__(self, logits: Tensor, threshold: float = 0.1, source: str = ""):
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] % 2:
            raise ValueError(f"router logits must be (steps, 2 * layers), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"router threshold must lie in [0, 1], got {threshold!r}")
        self.recompute = torch.sigmoid(logits.double()) > threshold  # (S, 2 L) bool, on the host
        self.threshold = float(threshold)
        self.source = source
        self.reset()

    @property
    def num_steps(self) -> int:
        return int(self.recompute.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.recompute.shape[1]) // 2

    def plan(self, step, layer):
        if step == 0:
            return True, True
        if step >= self.num_steps:
            raise ValueError(f"the router has {self.num_steps} steps; this run asked for step {step}: run with the "
                             "step count the router was trained for")
        return bool(self.recompute[step, 2 * layer]), bool(self.recompute[step, 2 * layer + 1])

    def _check_model(self, model) -> None:
        if model.num_layers != self.num_layers:
            raise ValueError(f"the router has logits for {self.num_layers} layers, the model has {model.num_layers}")

    def pattern(self, model, step):
        self._check_model(model)
        return super().pattern(model, step)

    def forward(self, model, x, timesteps, y, step):
        self._check_model(model)
        return super().forward(model, x, timesteps, y, step)

    def details(self):
        ran = self.recompute[1:].double().mean().item() if self.num_steps > 1 else 1.0
        return {"router": self.source, "router_steps": self.num_steps, "router_threshold": self.threshold,
                "router_recomputed_fraction": ran}


class CachingDenoiser(DuoDiff):
    """A denoiser running ``policy`` on the full U-ViT, optionally after DuoDiff's shallow phase.

    Its calls are not independent (each advances the trajectory's step and its caches), so the
    per-call :class:`~duodiff_fast.runtime.graphs.GraphDenoiser` calls it directly
    (``stateful_steps``); step graphs come from :class:`~duodiff_fast.runtime.cache_graphs.CacheStepGraphs`,
    and :class:`~duodiff_fast.runtime.graphs.GraphSampler` captures the whole loop with it.

    Args:
        full: the U-ViT. schedule: its noise schedule. policy: a caching policy.
        shallow, t_s: DuoDiff's shallow backbone and switch point (None, 0: no shallow phase).
    """

    stateful_steps = True

    def __init__(self, full, schedule, policy: _Policy, shallow=None, t_s: int = 0):
        _check_uvit(full)
        if isinstance(policy, DeepCachePolicy):
            _refuse_dit_deepcache(full)
        super().__init__(full if shallow is None else shallow, full, schedule, t_s)
        if shallow is None and t_s:
            raise ValueError("a DuoDiff switch point t_s needs the shallow backbone")
        self.policy = policy
        self.step = 0
        self._last_t: Optional[float] = None
        self._last_b: Optional[int] = None
        self.steps_run: List[int] = []  # the step index of each full-backbone evaluation (for tests/bench)
        # Set by runtime.cache_graphs.CacheStepGraphs.attach: runs each full-backbone step from
        # the graph of its pattern. The step index advances here, on the host, either way.
        self.step_runner = None

    def _advance(self, t: Tensor, batch: int) -> int:
        host = host_time(t)
        now = float(t.reshape(-1)[0]) if host is None else float(host)
        if self._last_t is None or now >= self._last_t or batch != self._last_b:
            self.policy.reset()
            self.step = 0
        else:
            self.step += 1
        self._last_t, self._last_b = now, batch
        return self.step

    def _run(self, model, x, t, y):
        if model is not self.full:
            return super()._run(model, x, t, y)
        from ..backends import model_dtype

        step = self._advance(t, x.shape[0])
        self.steps_run.append(step)
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        out_dtype, x = x.dtype, x.to(model_dtype(model))
        if self.step_runner is not None:
            return self.step_runner.run(self.policy, model, x, timesteps, y, step).to(out_dtype)
        return self.policy.forward(model, x, timesteps, y, step).to(out_dtype)
