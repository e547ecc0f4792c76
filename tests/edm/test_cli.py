"""`duodiff-fast sample --solver heun` on tiny EDM U-Nets, `duodiff-fast convert`, and the refusals."""
import json
import os

import numpy as np
import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.edm import build_edm_net, get_edm_config
from duodiff_fast.edm.checkpoint import EDM_FORMAT


def _randomized(name, seed=0):
    torch.manual_seed(seed)
    net = build_edm_net(get_edm_config(name))
    with torch.no_grad():  # move every weight off its (near-zero-output) init so samples differ by model
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("name", ["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"])
def test_sample_heun_from_exported_state_dict(tmp_path, name, one_thread):
    net = _randomized(name)
    raw = tmp_path / "exported.pt"
    torch.save(net.state_dict(), raw)  # what a user exports from EDM's pickle
    conv = tmp_path / "model.pt"
    assert main(["convert", str(raw), str(conv)]) == 0
    blob = torch.load(conv, weights_only=True)
    assert blob["format"] == EDM_FORMAT and blob["config"]["model_type"] == get_edm_config(name)["model_type"]
    out = tmp_path / "out"
    args = ["sample", "--solver", "heun", "--config", "auto", "--checkpoint", str(conv), "--steps", "3",
            "--n-samples", "3", "--batch-size", "2", "--out", str(out), "--no-progress", "--shard-size", "2"]
    assert main(args) == 0
    imgs = np.load(out / "samples.npz")["arr_0"]
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.uint8
    man = json.loads((out / "manifest.json").read_text())
    assert man["settings"]["nfe"] == 5 and man["settings"]["solver"] == "heun"
    # the same run through the Python API, batch by batch, gives the same images (batch-size independent)
    from duodiff_fast.edm import HeunConfig, heun_sample
    from duodiff_fast.samplers import NoiseSource, seeds_for, to_uint8

    lat = NoiseSource(seeds_for(0, 0, 3)).initial((3, 3, 8, 8))
    with torch.no_grad():
        ref = heun_sample(net.eval(), lat, HeunConfig(num_steps=3))
    assert np.abs(to_uint8(ref.float()).astype(int) - imgs.astype(int)).max() <= 1
    # named config with the raw state dict works too
    assert main(["sample", "--solver", "heun", "--config", name, "--checkpoint", str(raw), "--steps", "2",
                 "--n-samples", "1", "--out", str(tmp_path / "o2"), "--no-progress"]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["--config", "tiny"], "EDM's sampler"),
    (["--config", "edm-tiny-ddpmpp", "--backend", "triton"], "U-ViT transformer kernels"),
    (["--config", "edm-tiny-ddpmpp", "--cfg-scale", "2"], "do not apply"),
])
def test_refusals_exit_2(tmp_path, capsys, argv, msg):
    rc = main(["sample", "--solver", "heun", "--random-weights", "--out", str(tmp_path / "x"), *argv])
    assert rc == 2 and msg in capsys.readouterr().err


def test_edm_config_needs_heun(tmp_path, capsys):
    assert main(["sample", "--config", "edm-tiny-ddpmpp", "--random-weights", "--out", str(tmp_path)]) == 2
    assert "--solver heun" in capsys.readouterr().err


def test_convert_refuses_mismatch_and_non_edm(tmp_path, capsys):
    net = _randomized("edm-tiny-ddpmpp")
    raw = tmp_path / "sd.pt"
    torch.save(net.state_dict(), raw)
    assert main(["convert", str(raw), str(tmp_path / "o.pt"), "--config", "multistage-tiny-ddpmpp"]) == 2
    assert "does not fit" in capsys.readouterr().err
    torch.save({"pos_embed": torch.zeros(1)}, raw)
    assert main(["convert", str(raw), str(tmp_path / "o.pt")]) == 2
    assert "not an EDM U-Net" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.pt")


def test_conditional_edm_labels(tmp_path, capsys, one_thread):
    """A class-conditional EDM U-Net samples with --class-labels (one-hot inside EDMPrecond); ids past
    label_dim are refused before sampling."""
    cfg = get_edm_config("edm-tiny-ddpmpp")
    cfg["label_dim"] = 3
    torch.manual_seed(0)
    net = build_edm_net(cfg)
    from duodiff_fast.edm.checkpoint import save_edm_file

    path = tmp_path / "cond.pt"
    save_edm_file(net, cfg, str(path))
    base = ["sample", "--solver", "heun", "--config", "auto", "--checkpoint", str(path), "--steps", "2",
            "--n-samples", "2", "--no-progress"]
    assert main(base + ["--class-labels", "0,2", "--out", str(tmp_path / "a")]) == 0
    assert list(np.load(tmp_path / "a" / "samples.npz")["arr_1"]) == [0, 2]
    assert main(base + ["--class-labels", "3", "--out", str(tmp_path / "b")]) == 2
    assert "class ids" in capsys.readouterr().err


def test_configs_lists_edm_models(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "edm-cifar10-ddpmpp: SongUNet 32x32" in out and "multistage-cifar10-ddpmpp: MultistageUNet" in out


def test_convert_has_help():
    from duodiff_fast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["convert"]
    assert all(a.help for a in sub._actions if a.dest != "help")
