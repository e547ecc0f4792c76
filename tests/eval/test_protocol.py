"""The FID protocol of `duodiff-fast eval`: reference kinds (ADM reference batch, U-ViT stats, images),
the recorded and printed protocol, end to end on the tiny config."""
import json

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.cli import main  # noqa: E402
from duodiff_fast.eval import fid  # noqa: E402
from duodiff_fast.eval.protocol import reference_info  # noqa: E402

D = fid.FEATURE_DIM


def _adm_batch(path, n=3, seed=0):
    """A small file in the layout of ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 uint8 NHWC + mu/sigma."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((8, D))
    np.savez(path, arr_0=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), mu=rng.standard_normal(D),
             sigma=a.T @ a / 8 + np.eye(D))
    return path


def test_reference_kinds(tmp_path):
    adm = _adm_batch(tmp_path / "VIRTUAL_tiny_labeled.npz")
    info = reference_info(str(adm))
    assert info["kind"].startswith("ADM reference batch") and info["images"] == 3
    assert info["sha256"] == fid.file_sha256(adm)
    with np.load(adm) as d:  # the stored statistics are used, not recomputed from arr_0
        stats = fid.reference_stats(str(adm))
        np.testing.assert_array_equal(stats.mu, d["mu"])
        np.testing.assert_array_equal(stats.sigma, d["sigma"])
    np.savez(tmp_path / "fid_stats_tiny.npz", mu=np.zeros(D), sigma=np.eye(D))
    info = reference_info(str(tmp_path / "fid_stats_tiny.npz"))
    assert info["kind"].startswith("statistics file") and info["images"] is None
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert reference_info(str(tmp_path / "imgs.npz"))["kind"].startswith("image npz")
    with pytest.raises(FileNotFoundError):
        reference_info(str(tmp_path / "missing.npz"))


def test_eval_records_and_prints_the_protocol(tmp_path, capsys):
    from duodiff_fast.eval.fid import file_sha256
    from duodiff_fast.models import create_model
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "full.pth"
    torch.save(create_model("tiny").state_dict(), ckpt)
    ref = _adm_batch(tmp_path / "VIRTUAL_tiny_labeled.npz")
    out = tmp_path / "table"
    rc = main(["eval", "--config", "tiny", "--checkpoint", str(ckpt), "--random-inception", "--methods", "base",
               "--reference", str(ref), "--n-samples", "2", "--batch-size", "2", "--solver", "dpm_solver++",
               "--steps", "3", "--seed", "7", "--timing-repeats", "1", "--timing-warmup", "0", "--device", "cpu",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    p = json.loads((out / "results.json").read_text())["protocol"]
    assert p["n_samples"] == 2 and p["base_seed"] == 7 and "mix_seed(7, i)" in p["seeds"]
    assert p["solver"] == "dpm_solver++" and p["steps"] == 3
    assert p["solver_options"] == {"order": 2, "method": "multistep"}
    assert p["cfg"]["scale"] == 0 and p["cfg"]["formula"].startswith("off")
    assert p["weights"].startswith("raw")
    assert p["checkpoints"] == [{"path": str(ckpt), "sha256": file_sha256(ckpt)}]
    assert p["reference"]["sha256"] == file_sha256(ref) and p["reference"]["kind"].startswith("ADM")
    assert p["reference"]["count"] == 3
    assert p["inception"]["weights"] == "random" and "Inception-v3" in p["inception"]["network"]
    assert p["backend"] == "reference" and p["device"] == "cpu"
    printed = capsys.readouterr().out
    head, table = printed.split("| Method")[0], printed
    assert "Protocol" in head and file_sha256(ckpt) in head and file_sha256(ref) in head
    assert "weights random" in head and "dpm_solver++, 3 steps" in head
    assert "Protocol" in (out / "results.md").read_text()
