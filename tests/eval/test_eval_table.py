"""`duodiff-fast eval` end to end on the tiny config: random weights, random Inception, every method kind."""
import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.cli import main  # noqa: E402
from duodiff_fast.eval import fid  # noqa: E402
from duodiff_fast.eval.table import add_speedups, markdown_table  # noqa: E402


def test_speedups_and_markdown():
    rows = add_speedups([{"method": "duodiff t_s=300", "fid": 3.5, "time_per_sample_s": 0.5},
                         {"method": "base", "fid": 3.0, "time_per_sample_s": 1.0}])
    assert [r["speedup"] for r in rows] == [2.0, 1.0]
    md = markdown_table(rows, notes=["a note"], title="T")
    assert "| duodiff t_s=300 | 3.50 | 0.5 | 2.00x |" in md and "> a note" in md
    assert add_speedups([{"method": "ase D1", "fid": 1.0, "time_per_sample_s": 1.0}])[0]["speedup"] is None


def test_eval_grid_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "table"
    args = ["eval", "--config", "tiny", "--random-weights", "--random-inception",
            "--methods", "base,duodiff:500,adadiff:0.5,ase:D3,multistage", "--reference", str(tmp_path / "ref.npz"),
            "--stats-cache", str(tmp_path / "cache"), "--n-samples", "2", "--batch-size", "2", "--solver", "ddim",
            "--steps", "2", "--timing-repeats", "1", "--timing-warmup", "0", "--device", "cpu", "--no-progress",
            "--clip-denoised", "--out", str(out)]
    assert main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "duodiff t_s=500", "adadiff theta=0.5", "ase D3", "multistage"]
    for r in rows:
        assert float(r["fid"]) >= 0 and float(r["time_per_sample_s"]) > 0 and r["smoke_check"] == "True"
    assert float(rows[0]["speedup"]) == 1.0
    base_t = float(rows[0]["time_per_sample_s"])
    for r in rows[1:]:
        assert float(r["speedup"]) == pytest.approx(base_t / float(r["time_per_sample_s"]))
    md = (out / "results.md").read_text()
    assert "SMOKE CHECK" in md and "| ase D3 |" in md
    res = json.loads((out / "results.json").read_text())
    assert res["smoke_check"] and res["inception"] == "random-seed0" and res["reference"]["count"] == 3
    assert set(res["manifests"]) == {r["method"] for r in rows}
    assert res["manifests"]["ase D3"]["settings"]["ase_kept"] == [2, 1, 1, 1, 1]
    assert res["denoised"] == "clip" and all(m["settings"]["denoised"] == "clip" for m in res["manifests"].values())
    from PIL import Image

    assert Image.open(out / "fid_vs_time.png").size[0] > 300
    assert "SMOKE CHECK" in capsys.readouterr().out

    # The FID in the table is the one of the method's sample file against the reference.
    (cached,) = list((tmp_path / "cache").iterdir())  # the reference statistics, computed once
    ref = fid.FIDStats.load(cached)
    ex = fid.InceptionFeatures.random(0, "cpu")
    got = fid.compute_stats(ex.features_of(out / "samples" / "base" / "samples.npz"))
    assert float(rows[0]["fid"]) == pytest.approx(fid.fid_from_stats(got, ref), rel=1e-6)


def test_eval_refuses_missing_inception_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    rc = main(["eval", "--config", "tiny", "--random-weights", "--methods", "base", "--reference",
               str(tmp_path / "ref.npz"), "--n-samples", "2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert fid.INCEPTION_FILENAME in capsys.readouterr().err
    assert not (tmp_path / "o" / "samples").exists()


def test_every_eval_option_has_help():
    from duodiff_fast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    dests = {a.dest for a in sub._actions}
    assert {"methods", "reference", "inception_weights", "random_inception", "adadiff_checkpoint",
            "multistage_checkpoint", "solver", "n_samples", "shard_size"} <= dests
    assert not {"t_s", "theta", "method", "no_float"} & dests  # set per method by the grid
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"eval --{action.dest} has no help text"


def test_ase_table_has_the_papers_table1_layout():
    from duodiff_fast.eval.table import ase_table

    rows = [{"method": "base", "fid": 9.078, "time_per_sample_s": 1.0},
            {"method": "ase D1", "fid": 8.747, "time_per_sample_s": 0.8337},
            {"method": "duodiff t_s=300", "fid": 1.0, "time_per_sample_s": 0.5}]
    lines = ase_table(rows, "DiT", "DDPM-250").splitlines()
    assert lines[0] == "| Methods (DDPM-250) | FID (lower is better) | Accel. (time saved) |"
    assert lines[2:] == ["| DiT | 9.078 | - |", "| D1-DiT | 8.747 | 16.63% |"]
