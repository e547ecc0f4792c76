"""DiT through the trainer: DiT's recipe, the hybrid loss L_simple + L_vlb for the learned variance."""
import math

import numpy as np
import pytest
import torch

from duodiff_fast.models import create_model
from duodiff_fast.samplers.improved_ddpm import (ImprovedDiffusion, discretized_gaussian_log_likelihood, normal_kl,
                                                 vb_terms_bpd)
from duodiff_fast.schedules import linear_ddpm
from duodiff_fast.training import DIT_RECIPE, HybridObjective, Trainer, dit_train_config


def test_normal_kl_and_decoder_likelihood_closed_forms():
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(-0.2), torch.tensor(0.5)
    s1, s2 = math.exp(0.5 * -1.0), math.exp(0.5 * 0.5)
    ref = math.log(s2 / s1) + (s1 ** 2 + 0.5 ** 2) / (2 * s2 ** 2) - 0.5
    assert float(normal_kl(m1, lv1, m2, lv2)) == pytest.approx(ref, rel=1e-6)
    # a narrow Gaussian centred in a bin puts almost all mass in it; the end bins take the tails
    x = torch.tensor([0.0, 1.0, -1.0])
    ll = discretized_gaussian_log_likelihood(x, x.clone(), torch.full((3,), math.log(1e-4)))
    assert torch.allclose(ll, torch.zeros(3), atol=1e-5)


def test_vb_term_is_kl_for_k_positive_and_decoder_nll_at_zero():
    d = ImprovedDiffusion.from_schedule(linear_ddpm(), None)
    torch.manual_seed(0)
    x0, xt = torch.rand(2, 2, 4, 4) * 2 - 1, torch.randn(2, 2, 4, 4)
    out = torch.randn(2, 4, 4, 4) * 0.3
    k = torch.tensor([0, 500])
    vb = vb_terms_bpd(d, out, x0, xt, k)
    pm = d.p_mean_variance(lambda x, ts: out, xt, k)
    true_mean = d.posterior_mean_coef1[500] * x0[1] + d.posterior_mean_coef2[500] * xt[1]
    kl = normal_kl(true_mean.float(), d.posterior_log_variance_clipped[500].float(), pm["mean"][1], pm["log_variance"][1])
    assert float(vb[1]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-5)
    nll = -discretized_gaussian_log_likelihood(x0[0], pm["mean"][0], 0.5 * pm["log_variance"][0]).mean() / math.log(2)
    assert float(vb[0]) == pytest.approx(float(nll), rel=1e-5)


def test_hybrid_loss_trains_eps_by_mse_and_the_variance_by_the_bound():
    torch.manual_seed(0)
    m = create_model("dit-tiny")
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    obj = HybridObjective(linear_ddpm(), m.num_classes, p_uncond=0.0)
    seen = {}
    orig = m.forward

    def spy(x, t, y):
        out = orig(x, t, y)
        out.retain_grad()
        seen["out"] = out
        return out

    m.forward = spy
    x0 = torch.rand(3, 4, 8, 8) * 2 - 1
    loss, metrics = obj(m, x0, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(1))
    assert set(metrics) == {"loss", "mse", "vb"} and float(metrics["vb"]) > 0
    assert float(loss.detach()) == pytest.approx(float(metrics["mse"] + metrics["vb"]), rel=1e-6)
    loss.backward()
    g = seen["out"].grad
    eps = seen["out"][:, :4].detach()
    # eps gets the mse gradient only (stopped in the bound): d/d eps mean((eps - noise)^2)
    t, noise, _ = obj.sample(x0, torch.Generator().manual_seed(1))
    assert torch.allclose(g[:, :4], 2 * (eps - noise) / eps.numel(), atol=1e-7)
    assert g[:, 4:].abs().sum() > 0


def test_trainer_runs_dit_with_its_recipe_and_the_cli_samples_its_checkpoint(tmp_path):
    cfg = dit_train_config("dit-tiny", steps=3, batch_size=4, out_dir=str(tmp_path / "run"), device="cpu",
                           data={"source": "synthetic", "num_samples": 8, "seed": 0}, save_every=3,
                           log_every=1, progress=False)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.ema_decay, cfg.p_uncond) == (1e-4, 0.0, 0, 0.9999, 0.1)
    assert DIT_RECIPE["grad_clip"] is None
    trainer = Trainer(cfg)
    try:
        assert isinstance(trainer.loss_fn, HybridObjective)
        assert trainer.model.label_dropout_in_forward is False  # the objective drops labels (seeded)
        trainer.fit()
    finally:
        trainer.close()
    assert all(np.isfinite([r["loss"] for r in trainer.history])) and "vb" in trainer.history[-1]
    from duodiff_fast.cli import main

    rc = main(["sample", "--config", "dit-tiny", "--checkpoint", str(tmp_path / "run" / "latest.pt"), "--use-ema",
               "--solver", "ddpm", "--steps", "3", "--n-samples", "1", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "s")])
    assert rc == 0
