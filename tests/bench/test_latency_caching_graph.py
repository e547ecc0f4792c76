"""The caching-graph group of the latency benchmark (caching methods: plain loop, one graph per step
pattern, whole loop captured): its plan (CUDA only) and, on a CPU, its rows' plumbing."""
import torch

from duodiff_fast.bench import latency


def test_plan_cuda_only_without_tome_and_ddpm():
    argv = ["--backends", "reference", "--configs", "cifar10-s2", "--methods", "deepcache,tome,fora",
            "--method-solvers", "ddim,ddpm,dpm_solver++", "--method-backends", "eager-bf16,torch.compile"]
    groups = latency.plan(latency.resolve(latency.parse_args(argv), torch.device("cuda:0")), "cuda")
    cg = [g for g in groups if g["kind"] == "caching_graph"]
    assert [(g["backend"], g["solver"]) for g in cg] == [("eager-bf16", "ddim"), ("eager-bf16", "dpm_solver++")]
    assert cg[0]["rows"] == ["deepcache eager", "deepcache step-graphs", "deepcache graph",
                             "fora eager", "fora step-graphs", "fora graph"]
    none = latency.plan(latency.resolve(latency.parse_args(argv + ["--graph-solvers", ""]), torch.device("cuda:0")),
                        "cuda")
    assert not [g for g in none if g["kind"] == "caching_graph"]  # no graph rows asked for
    cpu = latency.plan(latency.resolve(latency.parse_args(argv[2:]), torch.device("cpu")), "cpu")
    assert not [g for g in cpu if g["kind"] == "caching_graph"]


def test_group_rows_on_cpu(one_thread):
    """On a CPU the plain and step-graph ways run (the step graphs fall back to eager steps); the
    whole-loop way captures nothing and its row fails saying so."""
    args = latency.resolve(latency.parse_args(["--repeats", "2", "--warmup", "0", "--no-progress", "--device",
                                               "cpu"]), torch.device("cpu"))
    runner = latency.Runner(args, torch.device("cpu"))
    g = dict(kind="caching_graph", config="tiny", backend="reference", solver="ddim", steps=3, id=1,
             rows=["deepcache eager", "deepcache step-graphs", "deepcache graph"])
    rows = {r["method"]: r for r in runner.group_caching_graph(g)}
    assert rows["deepcache eager"]["status"] == "ok" and rows["deepcache step-graphs"]["status"] == "ok"
    assert rows["deepcache step-graphs"]["speedup"]["over"] == "deepcache eager"
    assert rows["deepcache step-graphs"]["runtime"] == "cuda-graph per step pattern"
    assert rows["deepcache graph"]["status"] == "failed" and "capture failed" in rows["deepcache graph"]["error"]
