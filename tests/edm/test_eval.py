"""`duodiff-fast eval --solver heun`: the multistage paper's Table 1/2 row (method, NFE, GFLOPs per
evaluation weighted by stage, FID, time) for a tiny multistage EDM U-Net (random weights, random Inception)."""
import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.cli import main  # noqa: E402
from duodiff_fast.edm import HeunConfig, build_edm_net, get_edm_config  # noqa: E402
from duodiff_fast.edm.flops import forward_gflops, heun_eval_sigmas, weighted_gflops  # noqa: E402


def test_weighted_gflops_counts_stages():
    net = build_edm_net(get_edm_config("multistage-tiny-ddpmpp")).eval()
    cfg = HeunConfig(num_steps=6)
    sig = heun_eval_sigmas(cfg)
    assert len(sig) == 11
    cost = weighted_gflops(net, cfg)
    per = cost["gflops_per_stage"]
    assert per[0] > per[1] > per[2] > 0  # decoders 24, 16, 8 wide
    counts = cost["evals_per_stage"]
    assert sum(counts) == 11 and all(c > 0 for c in counts)
    assert cost["gflops_per_eval"] == pytest.approx(sum(c * g for c, g in zip(counts, per)) / 11)
    assert forward_gflops(net, sigma=0.1) == pytest.approx(per[0])  # row 0's sigma picks stage 0


def test_eval_writes_table_rows(tmp_path, capsys, one_thread):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "table"
    args = ["eval", "--config", "multistage-tiny-ddpmpp", "--random-weights", "--random-inception",
            "--methods", "edm", "--reference", str(tmp_path / "ref.npz"), "--stats-cache", str(tmp_path / "cache"),
            "--n-samples", "2", "--batch-size", "2", "--solver", "heun", "--steps", "3", "--timing-repeats", "1",
            "--timing-warmup", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    r = rows[0]
    assert r["method"] == "multistage edm heun" and r["nfe"] == "5"
    assert float(r["gflops_per_eval"]) > 0 and float(r["fid"]) >= 0 and float(r["time_per_sample_s"]) > 0
    md = (out / "results.md").read_text()
    assert "| Method | NFE | GFLOPs | FID | Time per sample (s) |" in md
    results = json.loads((out / "results.json").read_text())
    assert results["rows"][0]["evals_per_stage"]
    protocol = results["protocol"]  # the Heun grid is part of the recorded protocol
    assert protocol["solver"] == "heun" and protocol["solver_options"]["num_steps"] == 3
    assert protocol["cfg"]["formula"].startswith("off") and protocol["backend"] == "reference"
    assert main(args[:5] + ["--methods", "base"] + args[7:]) == 2
    assert "--methods edm" in capsys.readouterr().err
