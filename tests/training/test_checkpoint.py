"""Checkpoint files: rotation, latest.pt, weights_only loading, RNG capture."""
import random

import numpy as np
import pytest
import torch

from duodiff_fast.training import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state


def _state(step):
    return {"format": "duodiff_fast.train/1", "step": step, "model_state_dict": {"w": torch.full((2,), float(step))}}


def test_rotation_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        mgr.save(_state(step), step)
    assert mgr.list_steps() == [20, 30]
    assert load_checkpoint(mgr.latest())["step"] == 30
    assert load_checkpoint(mgr.path_for(20))["step"] == 20
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="model_state_dict"):
        load_checkpoint(str(tmp_path / "x.pt"))


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian around
    torch.save(capture_rng_state(gen), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(), torch.rand(3), torch.rand(2, generator=gen))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    gen.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    got = (random.random(), np.random.randn(), torch.rand(3), torch.rand(2, generator=gen))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
