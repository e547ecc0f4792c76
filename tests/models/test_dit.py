"""DiT against the official code's outputs (golden file), checkpoint loading and its pieces."""
import argparse

import pytest
import torch

from duodiff_fast.models import DiT, create_model, infer_dit_config, load_model
from duodiff_fast.models.checkpoint import CheckpointError, _dit_heads_from_args, checkpoint_info
from duodiff_fast.models.dit import sincos_pos_embed_2d
from duodiff_fast.models.layouts import DIT, detect_layout
from tests.conftest import rel_err


def _golden_model(g) -> DiT:
    model = DiT(**g["config"])
    model.load_state_dict(g["state_dict"])  # official key names load strictly
    return model.eval()


def test_forward_matches_official(dit_golden):
    f = dit_golden["forward"]
    with torch.no_grad():
        out = _golden_model(dit_golden)(f["x"], f["t"], f["y"])
    assert out.shape == f["out"].shape
    assert rel_err(out, f["out"]) < 1e-6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["eager-bf16", "torch.compile"])
def test_forward_matches_official_on_bf16_backends(dit_golden, backend, device):
    """The bfloat16 backends against the official outputs (inductor on the CPU: about 15 s)."""
    from duodiff_fast.backends import prepare_model
    from tests.conftest import device_or_skip

    device = device_or_skip(device, backend)
    f = dit_golden["forward"]
    model = prepare_model(_golden_model(dit_golden).to(device), backend)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = model(f["x"].to(device, torch.bfloat16), f["t"].to(device), f["y"].to(device)).float().cpu()
    assert rel_err(out, f["out"]) < 2e-2  # bfloat16 weights and activations vs the official float32


def test_forward_with_cfg_matches_official(dit_golden):
    c = dit_golden["forward_with_cfg"]
    with torch.no_grad():
        out = _golden_model(dit_golden).forward_with_cfg(c["x"], c["t"], c["y"], c["cfg_scale"])
    assert rel_err(out, c["out"]) < 1e-6


def test_state_dict_keys_equal_official(dit_golden):
    assert set(DiT(**dit_golden["config"]).state_dict()) == set(dit_golden["state_dict"])


def test_load_model_infers_the_config_of_an_official_file(dit_golden, tmp_path):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(dit_golden["state_dict"], path)  # the published files are plain state dicts
    assert detect_layout(dit_golden["state_dict"]) == DIT
    model = load_model(path)
    assert isinstance(model, DiT)
    cfg = dict(dit_golden["config"])
    assert model.config == cfg  # num_heads: the registered DiT of that width (dit-tiny)
    f = dit_golden["forward"]
    with torch.no_grad():
        assert rel_err(model.eval()(f["x"], f["t"], f["y"]), f["out"]) < 1e-6


def test_load_model_reads_dit_train_checkpoints(dit_golden, tmp_path):
    # DiT's train.py writes {"model", "ema", "opt", "args"} (args an argparse.Namespace).
    sd = dit_golden["state_dict"]
    raw = {k: v + 1.0 for k, v in sd.items()}
    ckpt = {"model": raw, "ema": sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "args": argparse.Namespace(model="DiT-tiny", image_size=64, num_classes=10)}
    path = tmp_path / "0000100.pt"
    torch.save(ckpt, path)
    ema = load_model(path, use_ema=True)
    assert torch.equal(ema.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    model = load_model(path)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    assert checkpoint_info(path).layout == DIT


def test_heads_from_train_args_and_registered_widths():
    assert _dit_heads_from_args({"model": "DiT-XL/2"}) == 16
    assert _dit_heads_from_args({"model": "DiT-S/8"}) == 6
    assert _dit_heads_from_args({"model": "other"}) is None
    sd = create_model("dit-b4-512-shallow").state_dict()
    cfg = infer_dit_config(sd)
    assert cfg == {**create_model("dit-b4-512").config, "depth": 3}


def test_mismatch_names_the_fitting_dit_config(tmp_path):
    sd = create_model("dit-tiny").state_dict()
    with pytest.raises(CheckpointError, match="fits config"):
        load_model(sd, config="dit-s2-256")


def test_learn_sigma_false_and_no_null_class():
    m = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
            class_dropout_prob=0.0, num_classes=5, learn_sigma=False)
    assert m.out_channels == 3 and m.num_classes == 5 and m.null_class is None
    assert infer_dit_config(m.state_dict(), num_heads=2)["learn_sigma"] is False


def test_unregistered_dit_width_needs_its_head_count():
    """The head count changes no weight shape: a DiT of a width no registered size has is refused
    without num_heads (never guessed), and a registered width takes the official head count."""
    from duodiff_fast.models import CheckpointError, load_model

    m = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    with pytest.raises(CheckpointError, match="head count cannot be told"):
        infer_dit_config(m.state_dict())
    with pytest.raises(CheckpointError, match="num_heads="):
        load_model(m.state_dict())
    assert load_model(m.state_dict(), num_heads=2).config["num_heads"] == 2
    s = DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=5)
    assert infer_dit_config(s.state_dict())["num_heads"] == 6  # DiT-S's width: its 6 heads


def test_fresh_dit_outputs_zeros_and_pos_embed_is_sincos():
    m = create_model("dit-tiny").eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = m(x, torch.tensor([3, 999]), torch.tensor([1, 10]))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0  # adaLN-Zero
    pe = sincos_pos_embed_2d(8, 2)  # 4 tokens; token k = (row k // 2, col k % 2)
    # first half encodes the column: sin(col * 1) at channel 0, second half the row
    assert torch.allclose(pe[:, 0], torch.sin(torch.tensor([0.0, 1.0, 0.0, 1.0])))
    assert torch.allclose(pe[:, 4], torch.sin(torch.tensor([0.0, 0.0, 1.0, 1.0])))
    assert torch.equal(m.pos_embed[0], sincos_pos_embed_2d(64, 4))
    assert not m.pos_embed.requires_grad


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    m = create_model("dit-tiny")
    y = torch.zeros(4000, dtype=torch.long)
    dropped = m.y_embedder.token_drop(y)
    assert abs(float((dropped == 10).float().mean()) - 0.1) < 0.02
    forced = m.y_embedder(torch.tensor([1, 2]), train=False, force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(forced, m.y_embedder.embedding_table.weight[[10, 2]])


def test_bad_inputs_raise_before_compute():
    m = create_model("dit-tiny")
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class ids"):
        m(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([11]))
    with pytest.raises(ValueError, match="needs labels"):
        m(torch.randn(1, 4, 8, 8), torch.tensor([1]), None)


def test_gradients_reach_every_trainable_parameter_and_checkpointing_agrees():
    torch.manual_seed(0)
    m = create_model("dit-tiny")
    for p in m.parameters():  # move off adaLN-Zero so every branch carries gradient
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([3, 10])
    m.eval()
    m(x, t, y).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    m.zero_grad()
    m.use_checkpoint = True
    m.train()
    m.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    m(x, t, y).square().mean().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_program_picks_the_backbone_and_refuses_other_modules():
    from duodiff_fast.models.program import DiTBackbone, UViTBackbone, backbone_for

    assert isinstance(backbone_for(create_model("dit-tiny")), DiTBackbone)
    assert isinstance(backbone_for(create_model("tiny")), UViTBackbone)
    with pytest.raises(TypeError, match="UViT or a DiT"):
        backbone_for(torch.nn.Linear(2, 2))
