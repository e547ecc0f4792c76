"""`duodiff-fast eval --methods base,deepcache,fora,tome,l2c:<file> --random-inception` end to end on the
tiny U-ViT on a CPU, against a reference in ADM's layout, with the protocol it records and prints."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.cli import main  # noqa: E402
from duodiff_fast.eval.fid import file_sha256  # noqa: E402
from tests.eval.test_protocol import _adm_batch  # noqa: E402


def test_eval_caching_grid(tmp_path, capsys, one_thread):
    router = tmp_path / "router.pth"
    torch.save({f"{k}.prob": torch.randn(10, generator=torch.Generator().manual_seed(k)) for k in range(4)}, router)
    from duodiff_fast.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "full.pth"
    torch.save(create_model("tiny").state_dict(), ckpt)
    ref = _adm_batch(tmp_path / "VIRTUAL_tiny_labeled.npz")
    out = tmp_path / "table"
    rc = main(["eval", "--config", "tiny", "--checkpoint", str(ckpt), "--random-inception", "--seed", "7",
               "--methods", f"base,deepcache:2,fora,tome,l2c:{router}", "--reference", str(ref),
               "--stats-cache", str(tmp_path / "cache"), "--n-samples", "2", "--batch-size", "2",
               "--solver", "dpm_solver++", "--dpm-method", "singlestep", "--order", "2", "--steps", "4",
               "--l2c-threshold", "0.5", "--timing-repeats", "1", "--timing-warmup", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "deepcache 2", "fora 2", "tome 0.5", "l2c router.pth threshold=0.5"]
    assert all(float(r["fid"]) >= 0 and float(r["time_per_sample_s"]) > 0 for r in rows)
    res = json.loads((out / "results.json").read_text())
    p = res["protocol"]
    assert p["n_samples"] == 2 and p["base_seed"] == 7 and "mix_seed(7, i)" in p["seeds"]
    assert p["solver"] == "dpm_solver++" and p["steps"] == 4
    assert p["solver_options"] == {"order": 2, "method": "singlestep"}
    assert p["cfg"]["scale"] == 0 and p["cfg"]["formula"].startswith("off")
    assert p["weights"].startswith("raw")
    assert p["checkpoints"] == sorted([{"path": str(ckpt), "sha256": file_sha256(ckpt)},
                                       {"path": str(router), "sha256": file_sha256(router)}], key=lambda c: c["path"])
    assert p["reference"]["sha256"] == file_sha256(ref) and p["reference"]["kind"].startswith("ADM")
    assert p["reference"]["count"] == 3  # the images of the ADM batch whose stored mu/sigma are used
    assert p["inception"]["weights"] == "random" and "Inception-v3" in p["inception"]["network"]
    assert p["backend"] == "reference" and p["device"] == "cpu"
    settings = res["manifests"]["l2c router.pth threshold=0.5"]["settings"]
    assert settings["router_steps"] == 4 and settings["method"] == "l2c" and settings["solver_method"] == "singlestep"
    assert 0 < settings["router_recomputed_fraction"] < 1
    # the caching methods change the samples (deepcache every other step, l2c per its router)
    base = np.load(out / "samples" / "base" / "samples.npz")["arr_0"]
    deep = np.load(out / "samples" / "deepcache-2" / "samples.npz")["arr_0"]
    assert base.shape == deep.shape and (base != deep).any()
    head = capsys.readouterr().out.split("| Method")[0]
    assert "Protocol" in head and file_sha256(ckpt) in head and file_sha256(ref) in head
    assert "weights random" in head and "dpm_solver++, 4 steps" in head
    assert "Protocol" in (out / "results.md").read_text()


def test_eval_caching_grid_on_dit(tmp_path, golden):
    """`eval --config dit-tiny --methods base,fora,tome,l2c:<file>`: the DiT caching rows, a router file in
    the published DiT layout (with its argparse.Namespace) read safely, and the protocol."""
    import argparse

    from tests.test_cli_dit import _ae, _trained_like_dit

    router = tmp_path / "DDIM3_router.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"routers": {f"{k}.prob": torch.randn(8, generator=g) for k in range(3)},
                "args": argparse.Namespace(model="DiT-XL/2", num_sampling_steps=3)}, router)
    ckpt = _trained_like_dit(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "table"
    rc = main(["eval", "--config", "dit-tiny", "--checkpoint", ckpt, "--random-inception", "--autoencoder",
               _ae(tmp_path, golden), "--methods", f"base,fora,tome,l2c:{router}", "--reference",
               str(tmp_path / "ref.npz"), "--stats-cache", str(tmp_path / "cache"), "--n-samples", "2",
               "--batch-size", "2", "--solver", "ddim", "--steps", "3", "--l2c-threshold", "0.5",
               "--timing-repeats", "1", "--timing-warmup", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["method"] for r in res["rows"]]
    assert names == ["base", "fora 2", "tome 0.5", "l2c DDIM3_router.pt threshold=0.5"]
    p = res["protocol"]
    assert p["solver"] == "ddim" and p["steps"] == 3 and p["backend"] == "reference"
    assert {"path": str(router), "sha256": file_sha256(router)} in p["checkpoints"]
    settings = res["manifests"][names[-1]]["settings"]
    assert settings["router_steps"] == 3 and settings["router_layout"].startswith("dit")
    base = np.load(out / "samples" / "base" / "samples.npz")["arr_0"]
    for slug in ("fora-2", "tome-0.5"):  # caching and merging change the samples
        other = np.load(out / "samples" / slug / "samples.npz")["arr_0"]
        assert other.shape == base.shape and (other != base).any(), slug
