"""Training checkpoints: atomic writes, rotation and RNG state capture.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)``:

    format            "duodiff_fast.train/1"
    step              finished optimizer steps
    model_state_dict  the unwrapped model's state dict (official U-ViT key names)
    ema_state_dict    the EMA copy's state dict (same keys); ema_meta: {"decay", "num_updates"}
    optimizer, scheduler   their state dicts
    rng               one entry per rank: {"python", "numpy", "torch", "cuda", "generator"}
    data              {"seed", "step", "epoch", "global_batch", "world_size"}
    config            the TrainConfig as a dict; model_config: the model's constructor keywords

Files in a run directory: ``ckpt_<step:08d>.pt`` (the last ``keep_last`` are kept) and
``latest.pt`` (a hard link to, or copy of, the newest one).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..io_utils import atomic_torch_save

CHECKPOINT_FORMAT = "duodiff_fast.train/1"
LATEST_NAME = "latest.pt"
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


# ------------------------------------------------------------------------------- RNG states
def capture_rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Python, numpy, torch CPU, the current CUDA device (when initialised) and ``generator``
    states, as tensors and plain values (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        # Only the current device: asking for every GPU's state would open a CUDA context on
        # each of them from every rank.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
        state["generator_device"] = str(generator.device)
    return state


def restore_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0])  # the current device
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ------------------------------------------------------------------------------ save / load
def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the old file intact)."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` and check its format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise ValueError(f"{path!r} is not a training checkpoint (no 'model_state_dict' entry)")
    fmt = state.get("format")
    if fmt is not None and fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} has checkpoint format {fmt!r}; this version reads {CHECKPOINT_FORMAT!r}")
    return state


def _link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src``, atomically replacing any old ``dst``."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class CheckpointManager:
    """Saves ``ckpt_<step>.pt`` files in ``directory``, keeps the newest ``keep_last`` and points
    ``latest.pt`` at the newest one.

    Args:
        directory: run directory (created on first save).
        keep_last: how many step checkpoints to keep (>= 1; None keeps all).
    """

    def __init__(self, directory: str, keep_last: Optional[int] = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt_{step:08d}.pt")

    @property
    def latest_path(self) -> str:
        return os.path.join(self.directory, LATEST_NAME)

    def list_steps(self) -> List[int]:
        """Steps of the step checkpoints present, ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for name in os.listdir(self.directory):
            m = _CKPT_RE.match(name)
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def save(self, state: Dict[str, Any], step: int) -> str:
        """Write the checkpoint of ``step``, update ``latest.pt``, drop old ones; returns its path."""
        os.makedirs(self.directory, exist_ok=True)
        path = self.path_for(step)
        save_checkpoint(state, path)
        _link_or_copy(path, self.latest_path)
        self._rotate()
        return path

    def _rotate(self) -> None:
        if self.keep_last is None:
            return
        for step in self.list_steps()[:-self.keep_last]:
            try:
                os.remove(self.path_for(step))
            except FileNotFoundError:
                pass

    def latest(self) -> Optional[str]:
        """Path of the newest checkpoint, or None when the directory holds none."""
        if os.path.isfile(self.latest_path):
            return self.latest_path
        steps = self.list_steps()
        return self.path_for(steps[-1]) if steps else None
