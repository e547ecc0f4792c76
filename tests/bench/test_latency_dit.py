"""DiT rows of the latency benchmark: the dit-cpu / dit-xl2 presets and the ASE-DiT rows (tiny, CPU)."""
import torch

from duodiff_fast.bench import latency


def test_dit_presets_plan_the_paper_rows():
    args = latency.resolve(latency.parse_args(["--preset", "dit-cpu"]), torch.device("cpu"))
    groups = latency.plan(args, "cpu")
    assert {g["config"] for g in groups} == {"dit-tiny"}
    rows = [r for g in groups for r in g["rows"]]
    assert "multistage" not in rows and sum(len(g["rows"]) for g in groups) <= 20
    ase = [g for g in groups if g["kind"] == "ase"]
    assert ase and ase[0]["rows"] == ["base", "ASE D1", "ASE D3", "ASE D4", "ASE D6"]
    assert [g["rows"] for g in groups if g["kind"] == "caching"] == [["base", "fora", "tome"]]
    args = latency.resolve(latency.parse_args(["--preset", "dit-cpu", "--methods", "deepcache,fora"]),
                           torch.device("cpu"))
    assert [g["rows"] for g in latency.plan(args, "cpu") if g["kind"] == "caching"] == [["base", "fora"]]
    gpu = latency.resolve(latency.parse_args(["--preset", "dit-xl2", "--ase-schedules", "D1,D2,D5,D6"]),
                          torch.device("cuda:0"))
    groups = latency.plan(gpu, "cuda")
    assert {g["config"] for g in groups} == {"dit-xl2-256"} and {g["kind"] for g in groups} == {"main", "ase", "graph"}
    assert [g for g in groups if g["kind"] == "ase"][0]["rows"] == ["base", "ASE D1", "ASE D6"]  # no D2/D5 for DiT


def test_dit_caching_rows_run(tmp_path):
    """FORA, ToMe and L2C rows on dit-tiny (a router file in the published DiT layout)."""
    import argparse

    router = tmp_path / "DDIM3_router.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"routers": {f"{k}.prob": torch.randn(8, generator=g) for k in range(3)},
                "args": argparse.Namespace(num_sampling_steps=3)}, router)
    res = latency.main(["--preset", "dit-cpu", "--solvers", "ddim", "--ddim-steps", "3", "--t-s", "0",
                        "--adadiff-thetas", "", "--methods", "fora,tome,l2c", "--l2c-router", str(router),
                        "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress",
                        "--out", str(tmp_path / "dit.json")])
    rows = {r["method"]: r for r in res["rows"] if r["kind"] == "caching"}
    assert set(rows) == {"base", "fora 2", "tome 0.5", "l2c DDIM3_router.pt threshold=0.1"}
    assert all(r["status"] == "ok" for r in res["rows"])
    l2c = rows["l2c DDIM3_router.pt threshold=0.1"]
    assert l2c["router_layout"].startswith("dit") and l2c["router_steps"] == 3
    assert rows["fora 2"]["cache_interval"] == 2 and rows["tome 0.5"]["tome_ratio"] == 0.5


def test_dit_ase_rows_run_and_record_the_schedule(tmp_path):
    res = latency.main(["--preset", "dit-cpu", "--solvers", "ddim", "--ddim-steps", "3", "--t-s", "0",
                        "--adadiff-thetas", "", "--ase-schedules", "D1,D6", "--batch-size", "1", "--repeats", "1",
                        "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "dit.json")])
    rows = {r["method"]: r for r in res["rows"] if r.get("kind", "ase") and r["method"].startswith("ASE")}
    assert set(rows) == {"ASE D1", "ASE D6"}
    assert rows["ASE D1"]["ase_schedule"] == [4, 4, 3, 3, 3] and rows["ASE D1"]["paper_speedup_pct"] == 16.63
    assert rows["ASE D6"]["num_blocks"] == 4 and 0 < rows["ASE D6"]["layer_bound_saving_pct"] < 100
    assert all(r["status"] == "ok" for r in res["rows"])


def test_dit_xl2_preset_times_the_triton_backend_and_auto():
    args = latency.resolve(latency.parse_args(["--preset", "dit-xl2"]), torch.device("cuda:0"))
    groups = latency.plan(args, "cuda")
    main = {g["backend"] for g in groups if g["kind"] == "main"}
    assert main == {"reference", "eager-bf16", "triton", "auto"}
    assert {g["backend"] for g in groups if g["kind"] == "ase"} == {"eager-bf16", "triton"}
    adadiff = {g["backend"] for g in groups if g["kind"] == "main" and any(r.startswith("AdaDiff") for r in g["rows"])}
    assert adadiff == {"eager-bf16", "triton"}
    # auto resolved to triton (what a GPU picks): one triton group per solver, not two
    args.auto_choices = {"dit-xl2-256": ("triton", "auto: triton passed self-check")}
    main = [g for g in latency.plan(args, "cuda") if g["kind"] == "main"]
    assert sorted(g["backend"] for g in main) == sorted(["reference", "eager-bf16", "triton"] * 2)


def test_dit_xl2_preset_plans_captured_sampler_rows_on_a_gpu_only():
    gpu = latency.plan(latency.resolve(latency.parse_args(["--preset", "dit-xl2"]), torch.device("cuda:0")), "cuda")
    graph = [g for g in gpu if g["kind"] == "graph"]
    assert {(g["config"], g["solver"], g["steps"], g["t_s"], g["batch_size"]) for g in graph} == {
        ("dit-xl2-256", "ddim", 50, t_s, b) for t_s in (0, 300) for b in (1, 32)}
    cpu = latency.plan(latency.resolve(latency.parse_args(["--preset", "dit-cpu"]), torch.device("cpu")), "cpu")
    assert not [g for g in cpu if g["kind"] == "graph"]
