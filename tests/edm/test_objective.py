"""Training a tiny (multistage) EDM model with the package's trainer: it runs, one stage per batch,
and an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one."""
import math

import pytest
import torch

from duodiff_fast.edm import EDMLoss, EDMMultistageLoss, EDMObjective, build_edm_net, get_edm_config
from duodiff_fast.training import TrainConfig, Trainer

CIFAR = [[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]


def _cfg(tmp_path, **changes):
    base = dict(model="tiny", data={"source": "synthetic", "num_samples": 16, "seed": 1}, batch_size=4, steps=4,
                lr=1e-3, warmup_steps=1, ema_decay=0.9, out_dir=str(tmp_path / "run"), save_every=2, keep_last=3,
                log_every=1, device="cpu", progress=False, resume=None, seed=3)
    base.update(changes)
    return TrainConfig(**base)


def _trainer(cfg, name="multistage-tiny-ddpmpp"):
    torch.manual_seed(0)
    net = build_edm_net(get_edm_config(name))
    loss = EDMMultistageLoss(CIFAR) if name.startswith("multistage") else EDMLoss()
    return Trainer(cfg, model=net, loss_fn=EDMObjective(loss))


def test_multistage_edm_trains_and_resumes_exactly(tmp_path, one_thread):
    full = _trainer(_cfg(tmp_path / "a"))
    stages = []
    orig = full.model.model.forward

    def spy(x, noise_labels, class_labels=None, augment_labels=None, stage=None):
        stages.append(full.model.model.stage_of(noise_labels))
        assert len({full.model.model.stage_of(noise_labels[i:i + 1]) for i in range(x.shape[0])}) == 1
        return orig(x, noise_labels, class_labels, augment_labels, stage)

    full.model.model.forward = spy
    full.fit()
    assert full.step == 4 and len(stages) == 4
    grads_seen = full.model.model.decs[stages[-1]]["8x8_aux_conv"].weight
    assert grads_seen.abs().sum() > 0
    # interrupted at step 2 (the checkpoint of save_every=2), resumed in a fresh trainer
    part = _trainer(_cfg(tmp_path / "b", steps=2))
    part.fit()
    resumed = _trainer(_cfg(tmp_path / "b", resume="auto"))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage_stream_follows_lognormal_mass():
    obj = EDMObjective(EDMMultistageLoss(CIFAR), seed=0)
    stages = [obj.stage_for_step(s) for s in range(600)]
    p0 = 0.5 * (1 + math.erf((math.log(2.5103) + 1.2) / 1.2 / math.sqrt(2)))
    assert stages.count(0) / 600 == pytest.approx(p0, abs=0.04)
    assert stages == [EDMObjective(EDMMultistageLoss(CIFAR), seed=0).stage_for_step(s) for s in range(600)]


def test_single_stage_edm_loss_falls(tmp_path, one_thread):
    tr = _trainer(_cfg(tmp_path, steps=30, save_every=0, lr=2e-3), name="edm-tiny-ddpmpp")
    losses = []
    orig = tr.loss_fn.__call__

    def rec(*a, **k):
        loss, m = orig(*a, **k)
        losses.append(float(loss.detach()))
        return loss, m

    tr.loss_fn = rec
    tr.fit()
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
