"""AdamW defaults (DuoDiff Table 4), warm-up schedule values, clipping, frozen parameters."""
import pytest
import torch
import torch.nn as nn

from duodiff_fast.training import LinearWarmup, TrainConfig, build_lr_scheduler, build_optimizer, clip_gradients
from duodiff_fast.training.optim import trainable_parameters


def test_paper_defaults():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.warmup_steps) == (2e-4, 0.03, (0.99, 0.999), 1500)
    assert cfg.batch_size == 128 and cfg.grad_clip == 1.0 and cfg.ema_decay == 0.9999
    assert cfg.resolved_p_uncond() == pytest.approx(0.1)
    assert cfg.replace(model="imagenet256-l2").resolved_p_uncond() == pytest.approx(0.15)
    opt = build_optimizer(nn.Linear(2, 2).parameters())
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (g["lr"], g["weight_decay"], g["betas"]) == (2e-4, 0.03, (0.99, 0.999))


def test_warmup_values():
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], lr=1.0)
    sched = build_lr_scheduler(opt, warmup_steps=4)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next update uses
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    w = LinearWarmup(1500)
    assert w(0) == pytest.approx(1 / 1500) and w(749) == pytest.approx(0.5) and w(1499) == 1.0 and w(10 ** 6) == 1.0
    assert LinearWarmup(0)(0) == 1.0


def test_scheduler_state_is_plain_data(tmp_path):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))])
    sched = build_lr_scheduler(opt, 10)
    opt.step()
    sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    sched2 = build_lr_scheduler(build_optimizer([nn.Parameter(torch.zeros(1))]), 10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 1


def test_clip_gradients():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_gradients([p], 1.0)
    assert float(norm) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    p.grad = torch.full((4,), 3.0)
    assert clip_gradients([p], None) is None and clip_gradients([p], 0) is None
    assert float(p.grad.norm()) == pytest.approx(6.0)


def test_frozen_parameters_left_out():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[0].requires_grad_(False)
    assert len(trainable_parameters(m)) == 2
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(trainable_parameters(m))
