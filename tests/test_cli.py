"""Smoke runs of the duodiff-fast command (in-process, tiny configs, random weights)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from duodiff_fast.cli import build_parser, main
from duodiff_fast.models import create_model, save_weights


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("sample", "train", "bench", "configs"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["sample", "train"])
def test_every_option_has_help(cmd):
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{cmd} --{action.dest} has no help text"


def test_configs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-s2-shallow" in out and "imagenet256-l2" in out


def test_sample_duodiff_ddpm_writes_outputs(tmp_path):
    out = tmp_path / "s"
    rc = main(["sample", "--config", "tiny", "--random-weights", "--t-s", "300", "--solver", "ddpm",
               "--steps", "20", "--n-samples", "3", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert torch.load(out / "samples.pt", weights_only=True).shape == (3, 3, 16, 16)
    assert Image.open(out / "grid.png").size[0] > 16


def test_sample_from_checkpoint_with_cfg_and_dpm_solver(tmp_path):
    ck = tmp_path / "w.safetensors"
    save_weights(create_model("tiny-cond"), ck)
    rc = main(["sample", "--config", "tiny-cond", "--checkpoint", str(ck), "--solver", "dpm_solver",
               "--steps", "6", "--cfg-scale", "1.5", "--class-labels", "1,2", "--n-samples", "2",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    assert np.load(tmp_path / "o" / "samples.npz")["arr_1"].tolist() == [1, 2]


def test_sample_same_seed_same_images_any_batch_size(tmp_path):
    args = ["sample", "--config", "tiny", "--random-weights", "--solver", "ddim", "--eta", "1",
            "--steps", "5", "--n-samples", "3", "--seed", "7", "--no-progress"]
    assert main(args + ["--batch-size", "1", "--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--batch-size", "3", "--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "samples.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "samples.pt", weights_only=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_sample_bad_inputs(tmp_path, capsys):
    # usage errors: exit status 2 and one line naming the problem, no traceback
    assert main(["sample", "--config", "tiny", "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["sample", "--config", "tiny-cond", "--random-weights", "--class-labels", "11",
                 "--out", str(tmp_path)]) == 2
    assert "class ids" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors exit 2 as well
        main(["sample", "--config", "tiny", "--backend", "nope"])
    assert e.value.code == 2
    assert main(["sample", "--config", "tiny", "--random-weights", "--t-s", "2000",
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert "t_s must lie in [0, 1000]" in capsys.readouterr().err
    assert main(["sample", "--config", "nope", "--random-weights", "--out", str(tmp_path)]) == 2
    assert "unknown model config" in capsys.readouterr().err
    ck = tmp_path / "shallow.pth"
    save_weights(create_model("tiny-shallow"), ck)
    assert main(["sample", "--config", "tiny", "--checkpoint", str(ck), "--out", str(tmp_path)]) == 2
    assert "fits config(s): tiny-shallow" in capsys.readouterr().err


def test_train_then_sample_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--config", "tiny-shallow", "--data", "synthetic", "--steps", "3", "--batch-size", "2",
               "--warmup-steps", "1", "--save-every", "0", "--log-every", "1", "--out-dir", str(run),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert (run / "latest.pt").exists()
    rc = main(["sample", "--config", "tiny-shallow", "--checkpoint", str(run / "latest.pt"), "--use-ema",
               "--steps", "3", "--n-samples", "1", "--out", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "lat.json"
    rc = main(["bench", "--configs", "tiny", "--solvers", "ddim", "--ddim-steps", "4", "--backends", "reference",
               "--t-s", "0,500", "--adadiff-thetas", "", "--methods", "", "--batch-size", "1", "--repeats", "1",
               "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device"] and data["environment"]["torch"] == torch.__version__
    duo = [r for r in data["rows"] if r.get("method") == "base" or str(r.get("method", "")).startswith("DuoDiff")]
    assert [r["t_s"] for r in duo] == [0, 500]
    assert data["rows"][0]["per_sample"]["median_s"] > 0


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "duodiff_fast", "--version"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0 and "duodiff-fast" in r.stdout


def test_latent_sampling_decodes_with_autoencoder(tmp_path, golden):
    ae = golden["autoencoder"]
    ck = tmp_path / "ae.pth"
    torch.save(ae["state_dict"], ck)
    out = tmp_path / "lat"
    rc = main(["sample", "--config", "tiny-latent", "--random-weights", "--autoencoder", str(ck),
               "--solver", "ddim", "--steps", "3", "--n-samples", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    side = 8 * 8  # tiny-latent is 4x8x8; KL-f8 decodes to 8x the size
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, side, side, 3)
    assert (out / "grid.png").exists()
    rc = main(["sample", "--config", "tiny-latent", "--random-weights", "--solver", "ddim", "--steps", "2",
               "--n-samples", "1", "--out", str(tmp_path / "raw"), "--no-progress"])
    assert rc == 0
    assert np.load(tmp_path / "raw" / "samples.npz")["arr_0"].shape == (1, 4, 8, 8)


def test_sample_help_lists_every_backend(capsys):
    from duodiff_fast.backends import BACKEND_CHOICES
    from duodiff_fast.cli import BACKEND_NAMES

    assert BACKEND_NAMES == BACKEND_CHOICES
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default auto)" in out
    for name in BACKEND_CHOICES:
        assert name in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_sample_triton_on_cpu_is_one_line_runtime_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "duodiff_fast", "sample", "--config", "tiny", "--random-weights",
                        "--backend", "triton", "--device", "cpu", "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=120,
                       # without Triton's CPU interpreter (which the test suite switches on), as a user runs it
                       env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                            "PYTHONPATH": os.getcwd()})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "duodiff-fast sample: error:" in lines[0] and "triton" in lines[0]
    assert not (tmp_path / "samples.npz").exists()


def test_bench_help_usage_names_the_subcommand():
    r = subprocess.run([sys.executable, "-m", "duodiff_fast", "bench", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0
    assert r.stdout.startswith("usage: duodiff-fast bench")


def test_train_no_progress_still_prints_the_resume_line(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--config", "tiny-shallow", "--data", "synthetic", "--batch-size", "2", "--warmup-steps", "1",
            "--save-every", "0", "--log-every", "100", "--out-dir", str(run), "--device", "cpu", "--no-progress"]
    assert main(base + ["--steps", "2"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert main(base + ["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out


def test_bench_usage_error_exits_2(capsys):
    assert main(["bench", "--backends", "nope", "--device", "cpu", "--no-progress"]) == 2
    assert "duodiff-fast bench: error: unknown backend 'nope'" in capsys.readouterr().err


def test_sample_without_backend_prints_and_records_auto_choice(tmp_path, capsys):
    """No --backend: auto. On the CPU it is the reference; the command prints the choice and the
    manifest records it (issue 20)."""
    out = tmp_path / "s"
    assert main(["sample", "--config", "tiny", "--random-weights", "--steps", "2", "--n-samples", "2",
                 "--batch-size", "2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "reference" and manifest["settings"]["backend"] == "reference"
    assert manifest["backend_choice"].startswith("auto: reference")
    assert f"backend: reference ({manifest['backend_choice']})" in printed
