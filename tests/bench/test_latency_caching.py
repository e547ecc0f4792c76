"""The latency benchmark's rows for the training-free methods (deepcache, fora, tome, l2c) and DPM-Solver++."""
import pytest
import torch

from duodiff_fast.bench.latency import main


def test_caching_rows(tmp_path, one_thread):
    router = tmp_path / "router.pth"
    torch.save({f"{k}.prob": torch.randn(10) for k in range(3)}, router)  # tiny: 5 layers, 3 NFE
    res = main(["--solvers", "dpm_solver++", "--t-s", "0", "--repeats", "2", "--warmup", "0", "--adadiff-thetas", "",
                "--methods", "deepcache,fora,tome,l2c", "--l2c-router", str(router), "--method-solvers",
                "dpm_solver++", "--dpm-steps", "3", "--no-progress", "--device", "cpu",
                "--out", str(tmp_path / "r.json")])
    rows = [r for r in res["rows"] if r["kind"] == "caching"]
    assert [r["method"] for r in rows] == ["base", "deepcache 3", "fora 2", "tome 0.5",
                                           f"l2c router.pth threshold=0.1"]
    assert all(r["status"] == "ok" and r["solver"] == "dpm_solver++" and r["steps"] == 3 for r in rows)
    assert all(r["speedup"] is not None for r in rows[1:])
    assert rows[1]["deepcache_depth"] == 1 and rows[4]["router_steps"] == 3


def test_l2c_row_needs_a_router():
    with pytest.raises(SystemExit, match="--l2c-router"):
        main(["--methods", "l2c", "--device", "cpu"])
