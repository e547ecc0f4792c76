"""The captured-sampler (graph) rows of the latency plan: DPM-Solver++ beside DDIM and DPM-Solver,
planned on CUDA only, with the DPM NFE, in the GPU suite's bounded plan."""
import pytest
import torch

from duodiff_fast.bench import latency


def _graph_groups(argv, device="cuda:0"):
    args = latency.resolve(latency.parse_args(argv), torch.device(device))
    groups = latency.plan(args, torch.device(device).type)
    return args, groups, [g for g in groups if g["kind"] == "graph"]


def test_gpu_suite_times_dpm_solver_pp_captured_and_uncaptured():
    args, groups, graph = _graph_groups(["--preset", "gpu-suite", "--backends", "reference,eager-bf16,torch.compile"])
    pp = [g for g in graph if g["solver"] == "dpm_solver++"]
    assert {(g["t_s"], g["batch_size"]) for g in pp} == {(0, 1), (0, 64), (300, 1), (300, 64)}
    assert all(g["rows"] == ["eager", "graph"] and g["steps"] == args.graph_dpm_steps == 20 for g in pp)
    assert {g["solver"] for g in graph} == {"ddim", "dpm_solver++"}
    assert sum(len(g["rows"]) for g in groups) <= 40  # the suite's bound (tests/bench/test_latency.py)


def test_cuda_default_and_explicit_graph_solvers():
    _, _, graph = _graph_groups(["--backends", "reference", "--configs", "cifar10-s2", "--graph-t-s", "0",
                                 "--graph-batches", "4", "--graph-dpm-steps", "7"])
    assert [(g["solver"], g["steps"]) for g in graph] == [("ddim", 50), ("dpm_solver", 7), ("dpm_solver++", 7)]
    _, _, graph = _graph_groups(["--backends", "reference", "--configs", "cifar10-s2", "--graph-solvers",
                                 "dpm_solver++", "--graph-t-s", "0,300", "--graph-batches", "2"])
    assert [(g["solver"], g["t_s"]) for g in graph] == [("dpm_solver++", 0), ("dpm_solver++", 300)]
    # a CPU plans no captured rows
    _, _, graph = _graph_groups(["--graph-solvers", "dpm_solver++"], device="cpu")
    assert graph == []
    with pytest.raises(SystemExit, match="unknown graph solver 'ddpm'.*dpm_solver\\+\\+"):
        _graph_groups(["--backends", "reference", "--graph-solvers", "ddpm"])
