"""ASE on DiT: the paper's DiT schedules, blocks dropped from the last one backward, through the layer program."""
import math

import pytest
import torch

from duodiff_fast.methods import ASEDenoiser
from duodiff_fast.methods.ase import PAPER_DIT_SCHEDULES, ase_forward, get_dropping_schedule
from duodiff_fast.models import DiT, create_model
from duodiff_fast.models.functional import unpatchify
from duodiff_fast.models.program import program_for
from duodiff_fast.schedules import linear_ddpm


def _dit(depth=4, seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_classes=5)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero: every block changes the output
    return m.eval()


def _by_hand(m: DiT, x, t, y, k: int) -> torch.Tensor:
    """The official module order with only the first k blocks."""
    tokens = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    for blk in m.blocks[:k]:
        tokens = blk(tokens, c)
    return unpatchify(m.final_layer(tokens, c), m.out_channels)


def test_paper_dit_schedules():
    assert PAPER_DIT_SCHEDULES["D1"][0] == (28, 26, 24, 22, 20)
    assert PAPER_DIT_SCHEDULES["D4"][0] == (28, 24, 20, 16, 12)
    d6 = get_dropping_schedule("D6", arch="dit")
    t = torch.tensor([0.1, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95], dtype=torch.float64)
    assert d6.kept_blocks(t).tolist() == [28, 24, 22, 20, 18, 12, 10, 8, 6]
    assert get_dropping_schedule("D3-DiT").kept == (28, 25, 22, 19, 16)
    with pytest.raises(ValueError, match="only for U-ViT"):
        get_dropping_schedule("D5", arch="dit")


def test_dropped_blocks_are_the_last_ones():
    m = _dit()
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 900.0]), torch.tensor([1, 5])
    with torch.no_grad():
        full = m(x, t, y)
        assert torch.equal(ase_forward(m, x, t, y, 4), full)
        for k in (0, 1, 3):
            assert torch.allclose(ase_forward(m, x, t, y, k), _by_hand(m, x, t, y, k), atol=1e-6)
        per_row = ase_forward(m, x, t, y, torch.tensor([1, 3]))
    assert torch.allclose(per_row[:1], _by_hand(m, x[:1], t[:1], y[:1], 1), atol=1e-6)
    assert torch.allclose(per_row[1:], _by_hand(m, x[1:], t[1:], y[1:], 3), atol=1e-6)
    with pytest.raises(ValueError, match="kept blocks"):
        ase_forward(m, x, t, y, 5)


def test_ase_denoiser_runs_the_kept_blocks_per_step():
    m = _dit(depth=28)
    calls = [0] * 28
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
    den = ASEDenoiser(m, linear_ddpm(), "D4")
    assert den.dropping.name == "D4-DiT"
    x, y = torch.randn(1, 4, 4, 4), torch.tensor([2])
    with torch.no_grad():
        out = den(x, torch.tensor([0.9]), y)  # last fifth: 12 of 28 blocks
    assert calls == [1] * 12 + [0] * 16 and out.shape == (1, 4, 4, 4)
    ref = _by_hand(m, x, linear_ddpm().model_input(torch.tensor([0.9])).float(), y, 12)
    assert torch.allclose(den.output(x, torch.tensor([0.9]), y), ref, atol=1e-6)


def test_exit_hook_runs_the_adaln_final_layer_on_leaving_rows():
    """The program's early-exit step on DiT: rows leave with their own c through an adaLN head."""
    m = _dit()

    class LeaveRowZeroAtLayer2:
        def before_layer(self, i, state, program):
            if i != 2:
                return None
            return torch.arange(state.h.shape[0]) == 0

        def head(self, i):
            return m.final_layer

    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([5.0, 500.0, 900.0]), torch.tensor([0, 1, 5])
    with torch.no_grad():
        out = program_for(m, x).run(x, t, y, hook=LeaveRowZeroAtLayer2())
        assert torch.allclose(out[0:1], _by_hand(m, x[:1], t[:1], y[:1], 2), atol=1e-6)
        assert torch.allclose(out[1:], m(x[1:], t[1:], y[1:]), atol=1e-6)


def test_cli_ase_on_tiny_dit(tmp_path):
    from duodiff_fast.cli import main
    import json

    for name, kept in (("D1", [4, 4, 3, 3, 3]), ("D6", [4, 3, 3, 3, 3, 2, 1, 1, 1])):
        out = tmp_path / name
        rc = main(["sample", "--config", "dit-tiny", "--random-weights", "--method", "ase", "--ase-schedule", name,
                   "--solver", "ddpm", "--steps", "3", "--n-samples", "1", "--device", "cpu", "--no-progress",
                   "--out", str(out)])
        assert rc == 0
        assert json.loads((out / "manifest.json").read_text())["settings"]["ase_kept"] == kept
    assert create_model("dit-tiny").depth == 4


def test_finetune_ase_on_dit_with_the_hybrid_loss(tmp_path):
    from duodiff_fast.methods import ASEDiT
    from duodiff_fast.methods.ase_training import ASEObjective, ase_finetune_config, finetune_ase
    from duodiff_fast.training import dit_train_config

    m = _dit(depth=4)
    obj = ASEObjective(linear_ddpm(), [4, 3, 2, 1, 1], m.num_classes)
    ase = ASEDiT.from_dit(m)
    loss, metrics = obj(ase, torch.rand(3, 4, 4, 4) * 2 - 1, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad
    cfg = ase_finetune_config(dit_train_config(dict(name="dit-tiny", input_size=4, hidden_size=32, num_heads=2,
                                                    num_classes=5), steps=2, batch_size=2, device="cpu",
                                               out_dir=str(tmp_path / "ase"), progress=False, save_every=2,
                                               data={"source": "synthetic", "num_samples": 4, "seed": 0}))
    assert cfg.lr == 2e-5
    trainer = finetune_ase(cfg, "D3", model=m)
    assert trainer.loss_fn.dropping.kept == (4, 4, 3, 3, 2)  # D3-DiT (28, 25, 22, 19, 16) at 4 blocks
    assert trainer.history[-1]["step"] == 2 and math.isfinite(trainer.history[-1]["loss"])
