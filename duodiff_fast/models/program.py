"""The U-ViT layer program: embed -> in-blocks -> mid-block -> out-blocks -> final layer, written once.

Every forward of the package runs through :class:`LayerProgram` -- the plain U-ViT, the fused
(Triton) U-ViT, AdaDiff's early exits, ASE's block dropping and the multistage decoders -- on the
executor (:mod:`duodiff_fast.models.executor`) picked for the call. Methods plug in as small hooks:

* ``hook`` (AdaDiff): before layer i, ``hook.before_layer(i, state, program)`` may return a (K,)
  bool mask of rows that leave; the program runs their exit head ``hook.head(i)``, writes them to
  their batch positions and compacts the rest -- hidden states, the pending skip stack and the
  hook's per-row ``state.carry`` tensors -- so later layers see only active rows. A hook with its
  own ``exit_rows`` replaces that exit step (AdaDiff's bucketed batch, padded to static shapes).
* ``keep`` (ASE): out-block j runs attention + MLP only where ``j < keep`` (an int, or a (B,) long
  tensor per row); a dropped out-block still applies its ``skip_linear`` (the long skip is kept).
* ``decoder`` (multistage): out-blocks, norm, prediction head and final conv come from this
  module (optionally with a ``proj_in`` from the shared width) instead of the U-ViT's own;
  :meth:`encode` and :meth:`decode` split the program after the mid-block so that rows of
  different stages share the encoder.

DuoDiff's backbone choice sits above the program: each backbone runs its own program.

Layer numbering: layer i (0-based) is in-block i for i < n_in, the mid-block for i == n_in and
out-block i - n_in - 1 after it (N = 2 n_in + 1 layers).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..ops.compaction import gather_rows, partition_order, scatter_rows, split_rows
from .executor import TorchExecutor, executor_for, needs_grad

__all__ = ["RowState", "LayerProgram", "program_for", "run_model", "run_layers"]

KeepSpec = Union[int, torch.Tensor]


class RowState:
    """The rows in flight between layers.

    Attributes:
        h: (K, N, D) tokens of the K active rows.
        skips: pending long-skip tensors, each (K, N, D), pushed by in-blocks, popped by out-blocks.
        carry: per-row tensors (K, ...) the methods need later (AdaDiff's time logits, ASE's
            per-row kept counts); compacted together with the rows.
        rows: (K,) original batch position of each active row (None: all rows, in order).
        out, exits: (B, C, H, W) outputs and (B,) exit layers of a batch that rows have left
            (None until the first exit).
    """

    def __init__(self, h: torch.Tensor, carry: Optional[Dict[str, torch.Tensor]] = None):
        self.h = h
        self.skips: List[torch.Tensor] = []
        self.carry: Dict[str, torch.Tensor] = dict(carry or {})
        self.rows: Optional[torch.Tensor] = None
        self.out: Optional[torch.Tensor] = None
        self.exits: Optional[torch.Tensor] = None

    @property
    def done(self) -> bool:
        """True when every row has left (there is nothing left to run)."""
        return self.h.shape[0] == 0

    def select(self, index: torch.Tensor, check: bool = True) -> "RowState":
        """A new state holding rows ``index`` (K,) of this one (h, skips and carry in one gather);
        ``check=False`` for an index in range by construction (no host read)."""
        names = list(self.carry)
        h, *rest = gather_rows([self.h, *self.skips, *(self.carry[n] for n in names)], index, check=check)
        new = RowState(h, dict(zip(names, rest[len(self.skips):])))
        new.skips = rest[:len(self.skips)]
        return new

    def compact(self, index: torch.Tensor, check: bool = True) -> None:
        """Keep only rows ``index`` (K,) of the active rows (in place)."""
        new = self.select(index, check)
        self.h, self.skips, self.carry = new.h, new.skips, new.carry
        self.rows = self.rows[index]


class LayerProgram:
    """The U-ViT ``model``'s layers run by ``executor`` (see the module docstring).

    Args:
        model: the U-ViT whose embedding, in-blocks and mid-block run (and, unless a ``decoder``
            is given, its out-blocks and final layer).
        executor: a :class:`~duodiff_fast.models.executor.TorchExecutor` or ``TritonExecutor``.
    """

    def __init__(self, model: nn.Module, executor):
        self.model = model
        self.ex = executor
        self.n_in = len(model.in_blocks)

    @property
    def num_layers(self) -> int:
        return 2 * self.n_in + 1

    # ---------------------------------------------------------------------------- the whole run
    def run(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, *,
            decoder: Optional[nn.Module] = None, keep: Optional[KeepSpec] = None, hook=None,
            carry: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """(B, C, H, W) images, (B,) timestep inputs, (B,) labels or None -> eps (B, C, H, W)."""
        state = self.encode(x, timesteps, y, hook=hook, carry=carry, keep=keep)
        if state.done:
            return state.out
        return self.decode(state, decoder=decoder, keep=keep, hook=hook)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, *,
               hook=None, carry: Optional[Dict[str, torch.Tensor]] = None,
               keep: Optional[KeepSpec] = None) -> RowState:
        """Embedding, in-blocks and mid-block: the state after the mid-block (rows may have left)."""
        carry = dict(carry or {})
        if isinstance(keep, torch.Tensor) and keep.dim() > 0:
            carry["keep"] = keep  # per-row kept counts follow their rows through compaction
        state = RowState(self.ex.embed(self.model, x, timesteps, y), carry)  # (B, E + L, D)
        self._layers(state, range(0, self.n_in + 1), None, keep, hook)
        return state

    def decode(self, state: RowState, *, decoder: Optional[nn.Module] = None, keep: Optional[KeepSpec] = None,
               hook=None) -> torch.Tensor:
        """Out-blocks and final layer of ``decoder`` (default: the model's) on a state from :meth:`encode`."""
        dec = self.model if decoder is None else decoder
        proj_in = getattr(dec, "proj_in", None)
        if proj_in is not None and not isinstance(proj_in, nn.Identity):
            state.h = proj_in(state.h)  # (K, N, D) -> (K, N, W): a stage of another width
        if not self._layers(state, range(self.n_in + 1, self.num_layers), dec, keep, hook):
            return state.out
        img = self.ex.final(dec, self.model.extras, self.model.in_chans, state.h)  # (K, C, H, W)
        if state.out is None:
            return img
        scatter_rows(state.out, state.rows, img)
        return state.out

    def run_layers(self, tokens: torch.Tensor, keep: Optional[KeepSpec] = None) -> torch.Tensor:
        """Every layer on embedded tokens, no final layer: (B, E + L, D) -> (B, E + L, D)."""
        carry = {"keep": keep} if isinstance(keep, torch.Tensor) and keep.dim() > 0 else {}
        state = RowState(tokens, carry)
        self._layers(state, range(self.num_layers), self.model, keep, None)
        return state.h

    # ---------------------------------------------------------------------------- the one loop
    def _layers(self, state: RowState, layers: range, decoder: Optional[nn.Module], keep: Optional[KeepSpec],
                hook) -> bool:
        """Run ``layers`` on ``state``; False when every row left before the end."""
        ex, n_in = self.ex, self.n_in
        for i in layers:
            if hook is not None:
                leave = hook.before_layer(i, state, self)
                if leave is not None and self._exit(i, state, leave, hook):
                    return False
            if i < n_in:
                state.h = ex.block(self.model.in_blocks[i], state.h)
                state.skips.append(state.h)
            elif i == n_in:
                state.h = ex.block(self.model.mid_block, state.h)
            else:
                j = i - n_in - 1
                blk = decoder.out_blocks[j]
                if keep is None:
                    state.h = ex.block(blk, state.h, state.skips.pop())
                    continue
                # The long skip is merged whether or not the block's attention and MLP run.
                state.h = ex.merge_skip(blk, state.h, state.skips.pop())
                state.h = self._transform_kept(blk, j, state, keep)
        return True

    def _transform_kept(self, blk: nn.Module, j: int, state: RowState, keep: Optional[KeepSpec]) -> torch.Tensor:
        """Out-block j's attention + MLP on the rows that keep it."""
        per_row = state.carry.get("keep")
        if per_row is None:
            return self.ex.transform(blk, state.h) if j < int(keep) else state.h
        h = state.h
        return split_rows(per_row > j, (True,), lambda _, rows: self.ex.transform(
            blk, h if rows is None else h.index_select(0, rows)), out=h)

    def _exit(self, i: int, state: RowState, leave: torch.Tensor, hook) -> bool:
        """Rows ``leave`` (K,) bool exit through ``hook.head(i)``; True when none is left.

        A hook with an ``exit_rows(i, state, leave, program)`` method does the exit itself (AdaDiff's
        bucketed batch keeps padded rows, with ``state.rows`` pointing padding at a trash row B).
        """
        exit_rows = getattr(hook, "exit_rows", None)
        if exit_rows is not None:
            return exit_rows(i, state, leave, self)
        # One host read per layer: the number of rows that stay (the next layer's batch). A stable
        # partition puts them first and the leaving rows after them, so both index lists are slices
        # of one permutation, in range by construction (no nonzero, no index check).
        stay = ~leave
        k = state.h.shape[0]
        order = partition_order(stay)
        n_stay = int(stay.sum())
        if n_stay == k:
            return False
        if state.out is None:
            m = self.model
            state.out = state.h.new_empty((k, m.in_chans, m.img_size, m.img_size))
            state.rows = torch.arange(k, device=state.h.device)
            state.exits = torch.full((k,), self.num_layers, dtype=torch.long, device=state.h.device)
        index = order[n_stay:]  # the leaving rows, in batch order
        (h_out,) = gather_rows([state.h], index, check=False)
        rows = state.rows.index_select(0, index)
        scatter_rows(state.out, rows, self.ex.final(hook.head(i), self.model.extras, self.model.in_chans, h_out))
        state.exits.index_fill_(0, rows, i)
        if n_stay == 0:
            state.h = state.h[:0]
            return True
        state.compact(order[:n_stay], check=False)
        return False


def _encoder_and_backend(model: nn.Module):
    """The U-ViT a model's program runs on, and the backend asked for (FusedUViT wraps a UViT)."""
    inner = model.__dict__.get("_modules", {}).get("uvit")
    if inner is not None:
        return inner, model.backend
    if not hasattr(model, "kernel_backend"):
        raise TypeError(f"the layer program runs a UViT, got {type(model).__name__}")
    return model, model.kernel_backend


def program_for(model: nn.Module, x: torch.Tensor, owner: Optional[nn.Module] = None) -> LayerProgram:
    """The program of one call of ``model`` (a UViT or FusedUViT) on input ``x``.

    ``owner`` is the module whose parameters decide whether the call records gradients (a method
    wrapping the U-ViT with heads or decoders of its own); default ``model``.
    """
    uvit, backend = _encoder_and_backend(model)
    grad_enabled = torch.is_grad_enabled()
    grad = needs_grad(owner if owner is not None else model, x) if grad_enabled else False
    checkpoint = uvit.use_checkpoint and uvit.training and grad_enabled
    return LayerProgram(uvit, executor_for(backend, x.device, grad, checkpoint))


def run_model(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None,
              **hooks) -> torch.Tensor:
    """``model``'s forward through its program (input checks are the caller's)."""
    return program_for(model, x).run(x, timesteps, y, **hooks)


def run_layers(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Every layer of a U-ViT on embedded tokens, eager (autograd, checkpointing): (B, N, D) -> (B, N, D)."""
    checkpoint = model.use_checkpoint and model.training and torch.is_grad_enabled()
    return LayerProgram(model, TorchExecutor(checkpoint)).run_layers(tokens)
