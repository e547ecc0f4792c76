"""End-to-end training on CPU: the loss falls, checkpoints, exact resume, hooks and errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from duodiff_fast.io_utils import read_jsonl
from duodiff_fast.models import UViT
from duodiff_fast.training import TrainConfig, Trainer, TensorDataset, load_checkpoint, train


def test_loss_falls_and_run_dir_contents(make_cfg, tiny_uvit, tmp_path):
    cfg = make_cfg(steps=120, batch_size=16, lr=2e-3, warmup_steps=10,
                   data={"source": "synthetic", "num_samples": 64, "seed": 0}, save_every=50, keep_last=2)
    trainer = train(cfg)
    losses = [r["loss"] for r in trainer.history]
    assert len(losses) == 120 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.75 * first, (first, last)

    run = cfg.out_dir
    log = read_jsonl(os.path.join(run, "log.jsonl"))
    assert [r["step"] for r in log] == list(range(1, 121))
    assert {"loss", "lr", "grad_norm", "epoch", "samples_per_s"} <= set(log[0])
    assert log[0]["lr"] == pytest.approx(2e-3 / 10) and log[-1]["lr"] == pytest.approx(2e-3)
    assert json.load(open(os.path.join(run, "config.json")))["train"]["steps"] == 120
    # save_every=50 -> steps 50, 100 and the final 120; keep_last=2 keeps 100 and 120.
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == \
        ["ckpt_00000100.pt", "ckpt_00000120.pt", "latest.pt"]

    ckpt = torch.load(os.path.join(run, "latest.pt"), weights_only=True)
    assert ckpt["step"] == 120
    reference_keys = set(UViT(**tiny_uvit()).state_dict())
    assert set(ckpt["model_state_dict"]) == reference_keys == set(ckpt["ema_state_dict"])
    assert {"optimizer", "scheduler", "rng", "data", "config", "model_config", "ema_meta"} <= set(ckpt)
    assert {"python", "numpy", "torch", "cuda", "generator"} <= set(ckpt["rng"][0])
    assert ckpt["model_config"]["embed_dim"] == 32 and ckpt["config"]["lr"] == 2e-3
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(ckpt["model_state_dict"][k], v)
    # The EMA lags the trained weights.
    w = "decoder_pred.weight"
    assert not torch.equal(ckpt["ema_state_dict"][w], ckpt["model_state_dict"][w])

    # Exported EMA weights record the model config next to a plain state dict; the models package
    # rebuilds the model from them, and reads the training checkpoint too.
    trainer.export_weights(str(tmp_path / "ema.pt"))
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert exported["model_config"] == {k: v for k, v in tiny_uvit().items() if k != "use_checkpoint"}
    UViT(**tiny_uvit()).load_state_dict(exported["state_dict"])
    from duodiff_fast.models import load_model

    assert load_model(tmp_path / "ema.pt").config == trainer.model.config

    ema_model = load_model(os.path.join(run, "latest.pt"), use_ema=True)
    assert torch.equal(ema_model.decoder_pred.weight, trainer.ema.module.decoder_pred.weight)


def _assert_same_state(a, b):
    for part in ("model_state_dict", "ema_state_dict"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), ("optimizer", i, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert torch.equal(a["rng"][0]["generator"], b["rng"][0]["generator"])
    assert a["step"] == b["step"] and a["ema_meta"] == b["ema_meta"]


def test_resume_in_new_process_is_bit_identical(make_cfg, tiny_uvit, tmp_path, train_script, child_env):
    # Conditional model (label dropout), flips, an epoch boundary (20 samples, batch 8) and the
    # end of the warm-up all fall inside the run.
    common = dict(model=tiny_uvit(num_classes=5), data={"source": "synthetic", "num_samples": 20, "hflip": True},
                  warmup_steps=5, steps=12)
    full = train(make_cfg(out_dir=str(tmp_path / "full"), **common))

    part_dir = str(tmp_path / "part")
    train(make_cfg(out_dir=part_dir, **dict(common, steps=5)))
    script, spec = train_script(make_cfg(out_dir=part_dir, resume="auto", **common))
    proc = subprocess.run([sys.executable, script, spec], env=child_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr  # progress=False: quiet

    a = load_checkpoint(os.path.join(full.cfg.out_dir, "latest.pt"))
    b = load_checkpoint(os.path.join(part_dir, "latest.pt"))
    _assert_same_state(a, b)
    full_log = read_jsonl(os.path.join(full.cfg.out_dir, "log.jsonl"))
    part_log = read_jsonl(os.path.join(part_dir, "log.jsonl"))
    assert [r["step"] for r in part_log] == list(range(1, 13))
    assert [r["loss"] for r in part_log] == [r["loss"] for r in full_log]


def test_resume_auto_at_end_is_a_no_op(make_cfg):
    cfg = make_cfg(steps=3)
    first = train(cfg)
    again = Trainer(cfg.replace(resume="auto"))
    assert again.step == 3 and again.resumed_from.endswith("latest.pt")
    again.fit()
    assert again.step == 3
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)


def test_named_shallow_config_trains(make_cfg):
    # A DuoDiff shallow backbone is the same call with the shallow registry name (shrunk here).
    cfg = make_cfg(model={"name": "cifar10-s2-shallow", "img_size": 8, "embed_dim": 32, "num_heads": 2},
                   schedule=None, steps=2)
    trainer = train(cfg)
    assert trainer.model.depth == 2 and trainer.schedule.num_timesteps == 1000
    assert trainer.step == 2


def test_init_weights_for_fine_tuning(make_cfg, tmp_path):
    first = train(make_cfg(steps=2, out_dir=str(tmp_path / "a")))
    first.export_weights(str(tmp_path / "w.pt"), ema=False)
    tuned = Trainer(make_cfg(out_dir=str(tmp_path / "b"), init_weights=str(tmp_path / "w.pt"), seed=5))
    assert tuned.step == 0
    for k, v in first.model.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[k], v) and torch.equal(tuned.ema.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="init_weights"):
        Trainer(make_cfg(init_weights=str(tmp_path / "none.pt")))


def test_bf16_autocast_on_cpu(make_cfg):
    trainer = train(make_cfg(steps=3, amp="bf16"))
    assert trainer.amp_dtype == torch.bfloat16
    assert np.isfinite(trainer.history[-1]["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    assert make_cfg(amp="auto") and Trainer(make_cfg(amp="auto")).amp_dtype is None  # off on CPU


def test_image_folder_training_with_workers(make_cfg, tiny_uvit, tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for k, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (80 * k, 40 * i, 200)).save(root / cls / f"{i}.png")
    trainer = train(make_cfg(model=tiny_uvit(num_classes=3), data=f"folder:{root}", steps=3, batch_size=4,
                             num_workers=1))
    assert not trainer.sampler.hflip  # flips are off unless asked (or a CIFAR-10/CelebA recipe)
    assert trainer.step == 3 and np.isfinite(trainer.history[-1]["loss"])
    assert json.load(open(os.path.join(trainer.cfg.out_dir, "config.json")))["train"]["hflip"] is False


def test_custom_loss_fn_and_frozen_backbone(make_cfg):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 3, 1)
            self.head = nn.Conv2d(3, 3, 1)

        def forward(self, x, timesteps, y=None):
            return self.head(self.backbone(x))

    calls = []

    def loss_fn(model, x0, y, generator):
        calls.append(y)
        out = model(x0, torch.zeros(x0.shape[0]), y)
        loss = out.pow(2).mean()
        return loss, {"loss": loss.detach(), "aux": 2.0}

    net = Net()
    net.backbone.requires_grad_(False)
    frozen = net.backbone.weight.clone()
    head = net.head.weight.clone()
    data = TensorDataset(torch.randn(16, 3, 8, 8))
    trainer = train(make_cfg(steps=4), model=net, loss_fn=loss_fn, dataset=data)
    assert torch.equal(net.backbone.weight, frozen) and not torch.equal(net.head.weight, head)
    assert trainer.history[-1]["aux"] == 2.0 and len(calls) == 4
    assert all(y is None for y in calls)  # the model has no num_classes: unconditional


def test_bad_settings_raise_clear_errors(make_cfg, tiny_uvit, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        make_cfg(batch_size=0)
    with pytest.raises(ValueError, match="amp"):
        make_cfg(amp="fp8")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(KeyError, match="unknown model config"):
        Trainer(make_cfg(model="no-such-model"))
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(make_cfg(resume=str(tmp_path / "missing.pt")))
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expects \(C, H, W\) = \(3, 8, 8\)"):
        Trainer(make_cfg(data=str(tmp_path / "d.npz")))
    with pytest.raises(ValueError, match="has no labels"):
        Trainer(make_cfg(model=tiny_uvit(num_classes=3)), dataset=TensorDataset(torch.zeros(4, 3, 8, 8)))
    with pytest.raises(ValueError, match="divisible"):
        from duodiff_fast.training import StepSampler
        StepSampler(10, 5, rank=0, world_size=2)


def test_nan_loss_stops_training(make_cfg):
    def loss_fn(model, x0, y, generator):
        loss = model(x0, torch.zeros(x0.shape[0])).mean() * float("nan")
        return loss, {}

    with pytest.raises(FloatingPointError, match="step 1"):
        train(make_cfg(steps=3, grad_clip=None), loss_fn=loss_fn)


def test_init_weights_from_a_run_folder(make_cfg, tmp_path):
    """A run folder (its export/ema) or an export folder starts a fine-tuning run; a folder of
    another head count is refused even though every weight shape fits."""
    from duodiff_fast.models import CheckpointError

    first = train(make_cfg(steps=2, out_dir=str(tmp_path / "a")))
    for src in (first.cfg.out_dir, os.path.join(first.cfg.out_dir, "export", "raw")):
        tuned = Trainer(make_cfg(out_dir=str(tmp_path / "b"), init_weights=src, resume=None))
        want = first.ema.module if src == first.cfg.out_dir else first.model
        for k, v in want.state_dict().items():
            assert torch.equal(tuned.model.state_dict()[k], v)
    other = dict(first.cfg.model, num_heads=first.cfg.model["num_heads"] // 2)
    with pytest.raises(CheckpointError, match="num_heads"):
        Trainer(make_cfg(model=other, out_dir=str(tmp_path / "c"), init_weights=first.cfg.out_dir))
