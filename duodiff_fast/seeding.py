"""Seeds derived from integers, for draws that must agree across processes and resumes.

Kept outside the training package so the EDM and multistage objectives can share
:class:`StepSeeded` without sampling code importing the trainer.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

__all__ = ["mix_seed", "StepSeeded"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepSeeded:
    """The ``on_step`` protocol for objectives that make a draw every rank must agree on.

    The Trainer calls :meth:`on_step` before each update; :meth:`step_generator` then gives a CPU
    generator seeded by (seed, step, ``STEP_STREAM``) only, so every DDP rank draws the same value
    and an exact resume repeats it. Without a Trainer the step stays at 0 unless told otherwise.
    A subclass sets ``STEP_STREAM`` to keep its draws apart from the trainer's other (seed, step)
    streams (data order, per-rank noise).
    """

    STEP_STREAM = 0

    seed: int = 0
    step: int = 0

    def on_step(self, step: int, seed: Optional[int] = None) -> None:
        """The next batch belongs to global optimizer step ``step`` of a run seeded with ``seed``."""
        self.step = int(step)
        if seed is not None:
            self.seed = int(seed)

    def step_generator(self, step: int) -> torch.Generator:
        """A CPU generator seeded by (seed, ``step``, ``STEP_STREAM``) alone."""
        return torch.Generator().manual_seed(mix_seed(self.seed, int(step), self.STEP_STREAM))
