"""AdaDiff on DiT: adaLN exit heads and UEMs, simulated, shrinking and bucketed exits agree; training loss."""
import json

import pytest
import torch

from duodiff_fast.methods import AdaDiff, AdaDiffObjective, AdaDiffUViT
from duodiff_fast.methods.adadiff import BucketStats
from duodiff_fast.models import DiT
from duodiff_fast.models.dit import FinalLayer
from duodiff_fast.models.functional import unpatchify
from duodiff_fast.schedules import linear_ddpm


def _model(seed=0) -> AdaDiffUViT:
    torch.manual_seed(seed)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=5)
    for p in dit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    m = AdaDiffUViT(dit, init_heads_from_final=False)
    for p in m.heads.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_heads_have_the_adaln_final_layer_shape_and_see_the_rows_c():
    m = _model()
    assert all(isinstance(h, FinalLayer) for h in m.heads) and len(m.heads) == 4 == len(m.uems)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 800.0]), torch.tensor([1, 5])
    with torch.no_grad():
        out = m(x, t, y)
        bb = m.backbone
        tokens = bb.x_embedder(x) + bb.pos_embed
        c = bb.t_embedder(t) + bb.y_embedder(y, False)
        tokens = bb.blocks[0](tokens, c)
        head1 = unpatchify(m.heads[1](tokens, c), 8)
    assert out.final.shape == (2, 8, 4, 4) and out.heads.shape == (4, 2, 8, 4, 4) and out.u.shape == (4, 2)
    assert torch.allclose(out.heads[1], head1, atol=1e-6)
    assert torch.allclose(out.final, bb(x, t, y), atol=1e-6)


@pytest.mark.parametrize("theta", [0.0, 0.5, 0.52, 1.0])
def test_shrinking_and_bucketed_exits_equal_the_simulated_exit(theta):
    m = _model()
    x, t, y = torch.randn(5, 4, 4, 4), torch.tensor([1.0, 200.0, 400.0, 600.0, 999.0]), torch.tensor([0, 1, 2, 3, 5])
    ref, ref_exits = m.exit_simulated(x, t, y, theta)
    eps, exits = m.exit_shrinking(x, t, y, theta)
    assert torch.equal(exits, ref_exits) and torch.allclose(eps, ref, atol=1e-5)
    stats = BucketStats()
    eps_b, exits_b = m.exit_bucketed(x, t, y, theta, stats=stats)
    assert torch.equal(exits_b, ref_exits) and torch.allclose(eps_b, ref, atol=1e-5)


def test_objective_uses_the_eps_channels_and_the_denoiser_samples_with_the_learned_variance():
    m = _model()
    obj = AdaDiffObjective(linear_ddpm(), m.num_classes)
    loss, metrics = obj(m.train(), torch.rand(2, 4, 4, 4) * 2 - 1, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(metrics) >= {"l_simple", "l_u", "l_ual"}
    den = AdaDiff(m.eval(), linear_ddpm(), 0.5)
    assert den.uses_improved_ddpm
    from duodiff_fast.samplers import sample

    out = sample(den, linear_ddpm(), (2, 4, 4, 4), solver="ddpm", num_steps=3, y=torch.tensor([1, 2]), progress=False)
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_cli_adadiff_on_tiny_dit(tmp_path):
    from duodiff_fast.cli import main

    for mode in ("shrinking", "simulated"):
        out = tmp_path / mode
        rc = main(["sample", "--config", "dit-tiny", "--random-weights", "--method", "adadiff", "--theta", "0.5",
                   "--adadiff-mode", mode, "--solver", "ddpm", "--steps", "3", "--n-samples", "2", "--device", "cpu",
                   "--no-progress", "--out", str(out)])
        assert rc == 0
        assert json.loads((out / "manifest.json").read_text())["settings"]["method"] == "adadiff"
