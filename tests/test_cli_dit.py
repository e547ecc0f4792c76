"""The command line on a tiny DiT (CPU): sample (DDPM/DDIM/DPM-Solver, guidance, latent decoding),
DuoDiff, bench and eval."""
import json

import numpy as np
import pytest
import torch

from duodiff_fast.cli import main


def _ae(tmp_path, golden):
    ck = tmp_path / "ae.pth"
    torch.save(golden["autoencoder"]["state_dict"], ck)
    return str(ck)


def _trained_like_dit(tmp_path) -> str:
    """dit-tiny weights moved off adaLN-Zero (a fresh DiT predicts zeros)."""
    from duodiff_fast.models import create_model

    torch.manual_seed(0)
    m = create_model("dit-tiny")
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "dit.pt"
    torch.save(m.state_dict(), path)  # the official layout: a plain state dict
    return str(path)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm_solver"])
def test_sample_dit_tiny_every_solver_with_guidance(tmp_path, solver):
    ck = _trained_like_dit(tmp_path)
    out = tmp_path / solver
    rc = main(["sample", "--config", "dit-tiny", "--checkpoint", ck, "--solver", solver, "--steps", "4",
               "--cfg-scale", "0.5", "--n-samples", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    x = np.load(out / "samples.npz")["arr_0"]
    assert x.shape == (2, 4, 8, 8) and np.isfinite(x).all() and np.abs(x).max() > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["config"] == "dit-tiny"


def test_dit_sample_is_batch_size_independent(tmp_path):
    ck = _trained_like_dit(tmp_path)
    common = ["sample", "--config", "dit-tiny", "--checkpoint", ck, "--solver", "ddpm", "--steps", "3",
              "--n-samples", "3", "--device", "cpu", "--no-progress"]
    assert main(common + ["--batch-size", "3", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--batch-size", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in "ab")
    assert np.allclose(a, b, atol=1e-5)


def test_dit_latents_decode_with_the_kl_f8_decoder(tmp_path, golden):
    out = tmp_path / "img"
    rc = main(["sample", "--config", "dit-tiny", "--checkpoint", _trained_like_dit(tmp_path),
               "--autoencoder", _ae(tmp_path, golden), "--solver", "ddim", "--steps", "2", "--n-samples", "2",
               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 64, 64, 3)  # 8x8 latents -> 64x64 images
    assert (out / "grid.png").exists()


def test_dit_duodiff_and_bad_options(tmp_path, capsys):
    out = tmp_path / "duo"
    rc = main(["sample", "--config", "dit-tiny", "--random-weights", "--t-s", "500", "--solver", "ddpm",
               "--steps", "4", "--n-samples", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    rc = main(["sample", "--config", "dit-tiny", "--random-weights", "--solver", "ddpm", "--variance", "beta_tilde",
               "--steps", "4", "--n-samples", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "x")])
    assert rc == 2 and "learned variance" in capsys.readouterr().err


def test_bench_dit_tiny(tmp_path):
    out = tmp_path / "lat.json"
    rc = main(["bench", "--configs", "dit-tiny", "--solvers", "ddim", "--ddim-steps", "3", "--backends", "reference",
               "--t-s", "0,500", "--adadiff-thetas", "", "--methods", "", "--batch-size", "1", "--repeats", "1",
               "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["t_s"] for r in rows] == [0, 500] and all(r["config"] == "dit-tiny" for r in rows)


def test_eval_dit_tiny_smoke(tmp_path, golden):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "table"
    rc = main(["eval", "--config", "dit-tiny", "--random-weights", "--random-inception", "--autoencoder",
               _ae(tmp_path, golden), "--methods", "base,ase:D4", "--reference", str(tmp_path / "ref.npz"),
               "--stats-cache", str(tmp_path / "cache"), "--n-samples", "2", "--batch-size", "2", "--solver", "ddim",
               "--steps", "2", "--timing-repeats", "1", "--timing-warmup", "0", "--device", "cpu", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["base", "ase D4"]
    table = (out / "table1_ase.md").read_text().splitlines()  # the ASE paper's Table 1 layout
    assert table[-4].startswith("| Methods (DDIM-2) | FID")
    assert table[-2].startswith("| DiT |") and table[-2].endswith("| - |")
    assert table[-1].startswith("| D4-DiT |") and table[-1].endswith("% |")


def test_dit_eager_bf16_runs_and_multistage_is_refused(tmp_path, capsys):
    rc = main(["sample", "--config", "dit-tiny", "--checkpoint", _trained_like_dit(tmp_path), "--backend",
               "eager-bf16", "--solver", "ddim", "--steps", "2", "--cfg-scale", "0.5", "--n-samples", "1",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path / "bf16")])
    assert rc == 0
    rc = main(["sample", "--config", "dit-tiny", "--random-weights", "--method", "multistage", "--n-samples", "1",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path / "ms")])
    assert rc == 2 and "U-ViT configs" in capsys.readouterr().err


def test_train_dit_shallow_twin_with_dits_recipe(tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--config", "dit-tiny-shallow", "--data", "synthetic", "--steps", "2", "--batch-size", "2",
               "--device", "cpu", "--out-dir", str(run), "--save-every", "2", "--no-progress"])
    assert rc == 0
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    assert (train_cfg["lr"], train_cfg["weight_decay"], train_cfg["warmup_steps"], train_cfg["grad_clip"],
            train_cfg["betas"], train_cfg["ema_decay"]) == (1e-4, 0.0, 0, None, [0.9, 0.999], 0.9999)
    rc = main(["train", "--config", "dit-tiny-shallow", "--data", "synthetic", "--steps", "1", "--batch-size", "2",
               "--device", "cpu", "--out-dir", str(tmp_path / "run2"), "--lr", "3e-4", "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "run2" / "config.json").read_text())["train"]["lr"] == 3e-4


def test_dit_sample_on_the_triton_backend(tmp_path):
    """``--backend triton`` runs a DiT (Triton's interpreter on a CPU; skipped where Triton cannot
    run) and gives the reference backend's latents within float32 summation-order error."""
    from tests.conftest import skip_unless_triton_runs

    skip_unless_triton_runs(torch.device("cpu"))
    ckpt = _trained_like_dit(tmp_path)
    outs = {}
    for backend in ("reference", "triton"):
        out = tmp_path / backend
        rc = main(["sample", "--config", "dit-tiny", "--checkpoint", ckpt, "--backend", backend, "--solver", "ddpm",
                   "--steps", "2", "--cfg-scale", "1.5", "--n-samples", "2", "--seed", "3", "--device", "cpu",
                   "--no-progress", "--out", str(out)])
        assert rc == 0
        assert json.loads((out / "manifest.json").read_text())["backend"] == backend
        outs[backend] = torch.load(out / "samples.pt", weights_only=True)
    ref = outs["reference"].double()
    assert float((outs["triton"].double() - ref).norm() / ref.norm()) < 1e-4


def test_train_every_method_on_dit_from_the_cli_and_sample_it(tmp_path, one_thread):
    """A user's DiT workflow from the command line alone: train the base model (its run folder
    records its config), its shallow twin, AdaDiff heads and an ASE fine-tune on it, then sample
    each method from what training wrote."""
    runs, common = tmp_path / "runs", ["--data", "synthetic", "--steps", "4", "--batch-size", "4"]
    assert main(["train", "--config", "dit-tiny", *common, "--out-dir", str(runs / "full")]) == 0
    cfg = json.loads((runs / "full" / "export" / "ema" / "config.json").read_text())
    assert cfg["model_type"] == "dit" and cfg["weights"] == "ema"
    assert main(["train", "--config", "dit-tiny", "--shallow", *common, "--out-dir", str(runs / "shallow")]) == 0
    assert main(["train", "--config", "dit-tiny", "--method", "adadiff", "--backbone", str(runs / "full"), *common,
                 "--out-dir", str(runs / "ada")]) == 0
    assert main(["train", "--config", "dit-tiny", "--method", "ase", "--ase-schedule", "D3", "--backbone",
                 str(runs / "full"), *common, "--out-dir", str(runs / "ase")]) == 0
    sample = ["sample", "--n-samples", "2", "--solver", "ddim", "--steps", "3", "--no-progress"]
    assert main(sample + ["--checkpoint", str(runs / "full"), "--out", str(tmp_path / "s_base")]) == 0  # no --config
    assert main(sample + ["--config", "dit-tiny", "--checkpoint", str(runs / "full"), "--shallow-checkpoint",
                          str(runs / "shallow" / "latest.pt"), "--t-s", "500", "--out", str(tmp_path / "s_duo")]) == 0
    assert main(sample + ["--config", "dit-tiny", "--method", "adadiff", "--theta", "0.1", "--adadiff-checkpoint",
                          str(runs / "ada" / "adadiff.pt"), "--out", str(tmp_path / "s_ada")]) == 0
    assert main(sample + ["--config", "dit-tiny", "--method", "ase", "--ase-schedule", "D3", "--ase-checkpoint",
                          f"D3={runs / 'ase' / 'ase_D3.pt'}", "--out", str(tmp_path / "s_ase")]) == 0
    base = np.load(tmp_path / "s_base" / "samples.npz")["arr_0"]
    for name in ("s_duo", "s_ada", "s_ase"):
        out = np.load(tmp_path / name / "samples.npz")["arr_0"]
        assert out.shape == base.shape and np.isfinite(out).all(), name
