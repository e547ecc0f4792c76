"""`duodiff-fast train --config <EDM config>`: trains from the command line, resumes exactly, and
writes a file that `sample --solver heun` reads; options that do not apply are usage errors."""
import numpy as np
import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.edm.checkpoint import EDM_FORMAT, load_edm_net
from duodiff_fast.edm.configs import get_edm_config, normalize_config


def _train(out_dir, name, steps, *extra):
    return main(["train", "--config", name, "--data", "synthetic", "--steps", str(steps), "--batch-size", "4",
                 "--save-every", "2", "--warmup-steps", "1", "--ema-decay", "0.9", "--device", "cpu",
                 "--log-every", "1", "--no-progress", "--seed", "3", "--out-dir", str(out_dir), *extra])


@pytest.mark.parametrize("name", ["multistage-tiny-ddpmpp", "edm-tiny-ddpmpp"])
def test_train_resume_and_sample_heun(tmp_path, capsys, name, one_thread):
    assert _train(tmp_path / "full", name, 4) == 0
    full = torch.load(tmp_path / "full" / "edm_ema.pt", weights_only=True)
    assert full["format"] == EDM_FORMAT and full["config"] == normalize_config(get_edm_config(name))
    # interrupted after 2 steps, rerun with the same --out-dir: resumes (default --resume auto) to the same weights
    assert _train(tmp_path / "part", name, 2) == 0
    half = torch.load(tmp_path / "part" / "edm_ema.pt", weights_only=True)["state_dict"]
    capsys.readouterr()
    assert _train(tmp_path / "part", name, 4) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "at step 2" in log, log
    resumed = torch.load(tmp_path / "part" / "edm_ema.pt", weights_only=True)["state_dict"]
    assert set(full["state_dict"]) == set(resumed)
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed[k]), k
    assert any(not torch.equal(half[k], resumed[k]) for k in half)  # the resumed steps did train
    # the EMA export is what the trainer's checkpoint holds as its EMA
    ckpt = torch.load(tmp_path / "part" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 4
    net, _ = load_edm_net(str(tmp_path / "part" / "edm_ema.pt"), name)
    for k, v in net.state_dict().items():
        assert torch.equal(v, resumed[k]), k
    out = tmp_path / "samples"
    for config in (name, "auto"):
        assert main(["sample", "--solver", "heun", "--config", config, "--checkpoint",
                     str(tmp_path / "part" / "edm_ema.pt"), "--steps", "2", "--n-samples", "2", "--batch-size", "2",
                     "--device", "cpu", "--out", str(out / config), "--no-progress"]) == 0
        imgs = np.load(out / config / "samples.npz")["arr_0"]
        assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8


@pytest.mark.parametrize("extra,flag", [
    (["--method", "multistage"], "--method"), (["--shallow"], "--shallow"), (["--backbone", "x.pt"], "--backbone"),
    (["--boundaries", "0.5"], "--boundaries"), (["--schedule", "cosine"], "--schedule"),
])
def test_options_that_do_not_apply_exit_2(tmp_path, capsys, extra, flag):
    rc = _train(tmp_path / "run", "edm-tiny-ddpmpp", 1, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "do not apply to EDM config" in err
    assert not (tmp_path / "run").exists()
