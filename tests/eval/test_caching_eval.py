"""`duodiff-fast eval --methods base,deepcache,fora,tome,l2c:<file> --random-inception` end to end on the
tiny U-ViT on a CPU, with its protocol."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.cli import main  # noqa: E402


def test_eval_caching_grid(tmp_path, capsys, one_thread):
    router = tmp_path / "router.pth"
    torch.save({f"{k}.prob": torch.randn(10, generator=torch.Generator().manual_seed(k)) for k in range(4)}, router)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "table"
    rc = main(["eval", "--config", "tiny", "--random-weights", "--random-inception",
               "--methods", f"base,deepcache:2,fora,tome,l2c:{router}", "--reference", str(tmp_path / "ref.npz"),
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
    assert p["solver"] == "dpm_solver++" and p["solver_options"] == {"order": 2, "method": "singlestep"}
    assert [c["path"] for c in p["checkpoints"]] == [str(router)]  # random weights: the router is the only file
    assert p["inception"]["weights"] == "random" and p["weights"].startswith("random")
    settings = res["manifests"]["l2c router.pth threshold=0.5"]["settings"]
    assert settings["router_steps"] == 4 and settings["method"] == "l2c" and settings["solver_method"] == "singlestep"
    assert 0 < settings["router_recomputed_fraction"] < 1
    # the caching methods change the samples (deepcache every other step, l2c per its router)
    base = np.load(out / "samples" / "base" / "samples.npz")["arr_0"]
    deep = np.load(out / "samples" / "deepcache-2" / "samples.npz")["arr_0"]
    assert base.shape == deep.shape and (base != deep).any()
    assert "Protocol" in capsys.readouterr().out
