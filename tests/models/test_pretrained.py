"""Checkpoint folders that know their config, and load_model never guessing a head count."""
import json
import os

import pytest
import torch

from duodiff_fast.models import CheckpointError, UViT, create_model, load_model, load_weights, save_weights
from duodiff_fast.models.configs import ModelSpec, get_spec
from duodiff_fast.models.pretrained import (
    CONFIG_FILE, WEIGHTS_FILE, export_folder, load_pretrained, resolve_pretrained_folder, save_pretrained,
)

# The case: width 128 trained with 4 heads; 2 heads (128 // 64) fit the same weights.
WIDE = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=128, depth=2, num_heads=4, mlp_ratio=4,
            qkv_bias=False, qk_scale=None, mlp_time_embed=False, num_classes=3, conv=True, skip=True)


def _model(**overrides):
    torch.manual_seed(0)
    return UViT(**dict(WIDE, **overrides)).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_head_count_is_not_told_by_the_weights():
    """Why the refusal matters: 2 and 4 heads load the same tensors but compute different outputs."""
    four = _model()
    two = _model(num_heads=2)
    two.load_state_dict(four.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    assert not torch.allclose(four(x, t, y), two(x, t, y), atol=1e-4)


def test_a_file_without_its_config_is_refused_not_guessed(tmp_path):
    four = _model()
    save_weights(four, tmp_path / "w.pth")  # a plain state dict: nothing records the head count
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "w.pth")
    msg = str(err.value)
    assert "head count" in msg and "embed_dim=128" in msg and "1, 2, 4, 8" in msg
    assert "--config" in msg and "num_heads=" in msg
    # Either way of resolving it gives the model that was saved.
    for kwargs in ({"num_heads": 4}, {"config": dict(WIDE)}):
        loaded = load_model(tmp_path / "w.pth", **kwargs)
        assert loaded.config["num_heads"] == 4
        _same_weights(loaded, four)
    with pytest.raises(CheckpointError, match="num_heads=2 contradicts"):
        load_model(tmp_path / "w.pth", config=dict(WIDE), num_heads=2)


def test_registered_shapes_keep_loading_without_a_config(tmp_path):
    """Official checkpoints (plain state dicts of a registered config) load as before."""
    m = create_model("tiny-cond")
    save_weights(m, tmp_path / "tiny.pth")
    loaded = load_model(tmp_path / "tiny.pth")
    assert loaded.config == get_spec("tiny-cond").kwargs
    _same_weights(loaded, m)


def test_folder_round_trip_is_exact(tmp_path):
    m = _model()
    folder = save_pretrained(m, tmp_path / "ckpt", extra={"weights": "raw", "step": 7}, time_input="normalized")
    assert sorted(os.listdir(folder)) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.load(open(os.path.join(folder, CONFIG_FILE)))
    assert config["model_type"] == "uvit" and config["model"] == WIDE
    assert config["weights"] == "raw" and config["step"] == 7 and config["time_input"] == "normalized"
    for loaded in (load_pretrained(folder), load_model(folder)):
        assert loaded.config == m.config and loaded.time_input == "normalized"
        _same_weights(loaded, m)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([1, 2])
        assert torch.equal(loaded.eval()(x, t, y), m(x, t, y))
    # Rewriting the folder replaces both files together.
    m2 = _model(num_heads=8)
    save_pretrained(m2, folder)
    assert load_model(folder).config["num_heads"] == 8
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_a_recorded_config_beats_a_wrong_one(tmp_path):
    folder = save_pretrained(_model(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 4 vs model 2"):
        load_weights(_model(num_heads=2), folder)
    spec = ModelSpec("two", dict(WIDE, num_heads=2), "linear")
    with pytest.raises(CheckpointError, match="records a different model config"):
        load_model(folder, config=spec)
    with pytest.raises(ValueError, match="num_heads: given 2 vs recorded 4"):
        load_pretrained(folder, config=spec)
    # The same config given explicitly is fine.
    _same_weights(load_model(folder, config=dict(WIDE)), _model())


def test_run_folder_gives_its_ema_export(tmp_path):
    run = tmp_path / "run"
    ema, raw = _model(), _model(num_heads=2)
    save_pretrained(ema, export_folder(run, "ema"), extra={"weights": "ema"})
    save_pretrained(raw, export_folder(run, "raw"), extra={"weights": "raw"})
    assert resolve_pretrained_folder(run) == export_folder(run, "ema")
    assert load_model(run).config["num_heads"] == 4
    assert load_model(export_folder(run, "raw")).config["num_heads"] == 2
    assert resolve_pretrained_folder(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_pretrained(tmp_path)


def test_safetensors_file_records_its_config(tmp_path):
    m = _model()
    save_weights(m, tmp_path / "w.safetensors", record_config=True)
    loaded = load_model(tmp_path / "w.safetensors")
    assert loaded.config == m.config
    _same_weights(loaded, m)
