"""The layer program: embed -> layers -> final layer, written once for every backbone.

Every forward of the package runs through :class:`LayerProgram` -- the plain U-ViT and DiT, the
fused (Triton) U-ViT, AdaDiff's early exits, ASE's block dropping and the multistage decoders --
on the executor (:mod:`duodiff_fast.models.executor`) picked for the call. A *backbone* describes
what differs between architectures (:class:`UViTBackbone`, :class:`DiTBackbone`, picked by
:func:`backbone_for`): its embedding, its layers and how a layer is conditioned, and its final
layer.

* U-ViT: the embedding makes [label, time, patch] tokens; layer i is in-block i for i < n_in (it
  pushes a long skip), the mid-block for i == n_in, out-block i - n_in - 1 after it (it pops and
  merges the skip first); N = 2 n_in + 1 layers. The final layer is LayerNorm, prediction,
  drop the extra tokens, unpatchify, conv.
* DiT: the embedding makes patch tokens and the conditioning c = t-embedding + label embedding
  (B, D), carried per row in ``state.carry["c"]``; layer i is block i, conditioned by adaLN from c;
  the final layer is adaLN-modulated LayerNorm, prediction, unpatchify.

Methods plug in as small hooks:

* ``hook`` (AdaDiff): before layer i, ``hook.before_layer(i, state, program)`` may return a (K,)
  bool mask of rows that leave; the program runs their exit head ``hook.head(i)``, writes them to
  their batch positions and compacts the rest -- hidden states, the pending skip stack and the
  per-row ``state.carry`` tensors (DiT's c among them) -- so later layers see only active rows. A
  hook with its own ``exit_rows`` replaces that exit step (AdaDiff's bucketed batch, padded to
  static shapes).
* ``keep`` (ASE; an int, or a (B,) long tensor per row): U-ViT out-block j runs attention + MLP
  only where ``j < keep`` and a dropped out-block still applies its ``skip_linear`` (the long skip
  is kept); DiT block i runs only where ``i < keep`` (blocks are dropped from the last one
  backward and skipped whole).
* ``decoder`` (multistage, U-ViT): out-blocks, norm, prediction head and final conv come from this
  module (optionally with a ``proj_in`` from the shared width) instead of the U-ViT's own;
  :meth:`encode` and :meth:`decode` split the program after the mid-block so that rows of
  different stages share the encoder (a DiT's encoder is all of its blocks).

DuoDiff's backbone choice sits above the program: each backbone runs its own program.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..ops.compaction import gather_rows, partition_order, scatter_rows, split_rows
from .executor import TorchExecutor, executor_for, needs_grad

__all__ = ["RowState", "LayerProgram", "UViTBackbone", "DiTBackbone", "backbone_for", "program_for", "run_model",
           "run_layers"]

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


class UViTBackbone:
    """How the program runs a U-ViT: token embedding, in-/mid-/out-blocks with long skips, final layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.n_in = len(model.in_blocks)
        self.num_layers = 2 * self.n_in + 1
        self.encoder_layers = self.n_in + 1  # in-blocks and mid-block: the part multistage shares
        self.out_channels = model.in_chans

    def embed(self, ex, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor],
              carry: Dict[str, torch.Tensor]) -> torch.Tensor:
        return ex.embed(self.model, x, timesteps, y)  # (B, E + L, D)

    def layer(self, program: "LayerProgram", i: int, state: RowState, decoder: nn.Module,
              keep: Optional[KeepSpec]) -> None:
        ex, n_in = program.ex, self.n_in
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
                return
            # The long skip is merged whether or not the block's attention and MLP run.
            state.h = ex.merge_skip(blk, state.h, state.skips.pop())
            state.h = program.kept_only(j, state, keep, lambda h, rows: ex.transform(blk, h))

    def final(self, ex, head: nn.Module, h: torch.Tensor, carry: Dict[str, torch.Tensor]) -> torch.Tensor:
        return ex.final(head, self.model.extras, self.model.in_chans, h)  # (K, C, H, W)


class DiTBackbone:
    """How the program runs a DiT: patch tokens and c, adaLN-conditioned blocks, adaLN final layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_layers = len(model.blocks)
        self.encoder_layers = self.num_layers
        self.out_channels = model.out_channels

    def embed(self, ex, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor],
              carry: Dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, c = ex.dit_embed(self.model, x, timesteps, y)  # (B, L, D), (B, D)
        carry["c"] = c  # follows its rows through compaction
        return tokens

    def layer(self, program: "LayerProgram", i: int, state: RowState, decoder: nn.Module,
              keep: Optional[KeepSpec]) -> None:
        blk = self.model.blocks[i]
        ex = program.ex
        if keep is None:
            state.h = ex.adaln_block(blk, state.h, state.carry["c"])
            return
        c = state.carry["c"]
        state.h = program.kept_only(i, state, keep, lambda h, rows: ex.adaln_block(
            blk, h, c if rows is None else c.index_select(0, rows)))

    def final(self, ex, head: nn.Module, h: torch.Tensor, carry: Dict[str, torch.Tensor]) -> torch.Tensor:
        layer = self.model.final_layer if head is self.model else head  # an exit head has the same shape
        return ex.adaln_final(layer, h, carry["c"], self.out_channels)  # (K, C_out, H, W)


def backbone_for(model: nn.Module):
    """The backbone description of ``model`` (a UViT or a DiT)."""
    if hasattr(model, "in_blocks"):
        return UViTBackbone(model)
    if hasattr(model, "blocks") and hasattr(model, "final_layer") and hasattr(model, "t_embedder"):
        return DiTBackbone(model)
    raise TypeError(f"the layer program runs a UViT or a DiT, got {type(model).__name__}")


class LayerProgram:
    """The ``model``'s layers run by ``executor`` (see the module docstring).

    Args:
        model: the U-ViT or DiT whose embedding and layers run (for a U-ViT with a ``decoder``:
            its embedding, in-blocks and mid-block; the decoder's out-blocks and final layer).
        executor: a :class:`~duodiff_fast.models.executor.TorchExecutor` or ``TritonExecutor``.
    """

    def __init__(self, model: nn.Module, executor):
        self.model = model
        self.ex = executor
        self.backbone = backbone_for(model)
        self.n_in = getattr(self.backbone, "n_in", None)  # U-ViT only

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    # ---------------------------------------------------------------------------- the whole run
    def run(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, *,
            decoder: Optional[nn.Module] = None, keep: Optional[KeepSpec] = None, hook=None,
            carry: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """(B, C, H, W) images, (B,) timestep inputs, (B,) labels or None -> (B, C_out, H, W)."""
        state = self.encode(x, timesteps, y, hook=hook, carry=carry, keep=keep)
        if state.done:
            return state.out
        return self.decode(state, decoder=decoder, keep=keep, hook=hook)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, *,
               hook=None, carry: Optional[Dict[str, torch.Tensor]] = None,
               keep: Optional[KeepSpec] = None) -> RowState:
        """Embedding and the encoder layers (U-ViT: in-blocks and mid-block; DiT: every block):
        the state after them (rows may have left)."""
        carry = dict(carry or {})
        if isinstance(keep, torch.Tensor) and keep.dim() > 0:
            carry["keep"] = keep  # per-row kept counts follow their rows through compaction
        h = self.backbone.embed(self.ex, x, timesteps, y, carry)  # (B, N, D); DiT adds carry["c"]
        state = RowState(h, carry)
        self._layers(state, range(0, self.backbone.encoder_layers), None, keep, hook)
        return state

    def decode(self, state: RowState, *, decoder: Optional[nn.Module] = None, keep: Optional[KeepSpec] = None,
               hook=None) -> torch.Tensor:
        """Decoder layers and final layer of ``decoder`` (default: the model's) on a state from :meth:`encode`."""
        dec = self.model if decoder is None else decoder
        proj_in = getattr(dec, "proj_in", None)
        if proj_in is not None and not isinstance(proj_in, nn.Identity):
            state.h = proj_in(state.h)  # (K, N, D) -> (K, N, W): a stage of another width
        if not self._layers(state, range(self.backbone.encoder_layers, self.num_layers), dec, keep, hook):
            return state.out
        img = self.backbone.final(self.ex, dec, state.h, state.carry)  # (K, C_out, H, W)
        if state.out is None:
            return img
        scatter_rows(state.out, state.rows, img)
        return state.out

    def run_layers(self, tokens: torch.Tensor, keep: Optional[KeepSpec] = None,
                   c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every layer on embedded tokens, no final layer: (B, N, D) -> (B, N, D) (DiT: with its c (B, D))."""
        carry = {"keep": keep} if isinstance(keep, torch.Tensor) and keep.dim() > 0 else {}
        if c is not None:
            carry["c"] = c
        state = RowState(tokens, carry)
        self._layers(state, range(self.num_layers), self.model, keep, None)
        return state.h

    # ---------------------------------------------------------------------------- the one loop
    def _layers(self, state: RowState, layers: range, decoder: Optional[nn.Module], keep: Optional[KeepSpec],
                hook) -> bool:
        """Run ``layers`` on ``state``; False when every row left before the end."""
        for i in layers:
            if hook is not None:
                leave = hook.before_layer(i, state, self)
                if leave is not None and self._exit(i, state, leave, hook):
                    return False
            self.backbone.layer(self, i, state, decoder, keep)
        return True

    def kept_only(self, j: int, state: RowState, keep: KeepSpec, run) -> torch.Tensor:
        """``run(h, rows)`` on the rows whose kept count exceeds j, the others unchanged:
        ``rows`` is None when the whole batch runs (ASE's dropped blocks)."""
        per_row = state.carry.get("keep")
        if per_row is None:
            return run(state.h, None) if j < int(keep) else state.h
        h = state.h
        return split_rows(per_row > j, (True,), lambda _, rows: run(
            h if rows is None else h.index_select(0, rows), rows), out=h)

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
            state.out = state.h.new_empty((k, self.backbone.out_channels, m.img_size, m.img_size))
            state.rows = torch.arange(k, device=state.h.device)
            state.exits = torch.full((k,), self.num_layers, dtype=torch.long, device=state.h.device)
        index = order[n_stay:]  # the leaving rows, in batch order
        names = [n for n in ("c",) if n in state.carry]  # what the final layer reads besides h
        h_out, *picked = gather_rows([state.h, *(state.carry[n] for n in names)], index, check=False)
        rows = state.rows.index_select(0, index)
        scatter_rows(state.out, rows, self.backbone.final(self.ex, hook.head(i), h_out, dict(zip(names, picked))))
        state.exits.index_fill_(0, rows, i)
        if n_stay == 0:
            state.h = state.h[:0]
            return True
        state.compact(order[:n_stay], check=False)
        return False


def _encoder_and_impl(model: nn.Module):
    """The U-ViT or DiT a model's program runs on, and the op implementation it asks for (FusedUViT wraps a UViT)."""
    inner = model.__dict__.get("_modules", {}).get("uvit")
    if inner is not None:
        return inner, model.impl
    if not hasattr(model, "op_impl"):
        raise TypeError(f"the layer program runs a UViT or a DiT, got {type(model).__name__}")
    return model, model.op_impl


def program_for(model: nn.Module, x: torch.Tensor, owner: Optional[nn.Module] = None) -> LayerProgram:
    """The program of one call of ``model`` (a UViT, FusedUViT or DiT) on input ``x``.

    ``owner`` is the module whose parameters decide whether the call records gradients (a method
    wrapping the U-ViT with heads or decoders of its own); default ``model``.
    """
    uvit, requested = _encoder_and_impl(model)
    grad_enabled = torch.is_grad_enabled()
    grad = needs_grad(owner if owner is not None else model, x) if grad_enabled else False
    checkpoint = uvit.use_checkpoint and uvit.training and grad_enabled
    return LayerProgram(uvit, executor_for(requested, x.device, grad, checkpoint))


def run_model(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None,
              **hooks) -> torch.Tensor:
    """``model``'s forward through its program (input checks are the caller's)."""
    return program_for(model, x).run(x, timesteps, y, **hooks)


def run_layers(model: nn.Module, tokens: torch.Tensor, c: Optional[torch.Tensor] = None,
               keep: Optional[KeepSpec] = None) -> torch.Tensor:
    """Every layer of a U-ViT or DiT (with its c (B, D)) on embedded tokens, eager (autograd,
    checkpointing): (B, N, D) -> (B, N, D)."""
    checkpoint = model.use_checkpoint and model.training and torch.is_grad_enabled()
    return LayerProgram(model, TorchExecutor(checkpoint)).run_layers(tokens, keep, c)
