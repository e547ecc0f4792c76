"""EDM rows of the latency benchmark: the edm-cpu / edm-cifar10 presets, weighted GFLOPs, the speedup of
the multistage U-Net over the single U-Net, failing rows that say why (tiny configs, CPU)."""
import json

import pytest
import torch

from duodiff_fast.bench import edm_latency, latency
from duodiff_fast.edm import HeunConfig, build_edm_net, get_edm_config
from duodiff_fast.edm.flops import weighted_gflops


def _resolved(argv, device):
    return edm_latency.resolve_edm(latency.parse_args(argv), torch.device(device))


def test_presets_plan_the_rows():
    cpu = _resolved(["--preset", "edm-cpu"], "cpu")
    groups = edm_latency.plan_edm(cpu)
    assert [g["backend"] for g in groups] == ["reference", "eager-bf16"] and {g["kind"] for g in groups} == {"edm"}
    assert groups[0]["configs"] == ["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"]
    gpu = _resolved(["--preset", "edm-cifar10"], "cuda:0")
    groups = edm_latency.plan_edm(gpu)
    assert gpu.heun_steps == 18 and 2 * gpu.heun_steps - 1 == 35
    assert [g["backend"] for g in groups if g["kind"] == "edm"] == ["reference", "eager-bf16", "torch.compile"]
    assert [g["backend"] for g in groups if g["kind"] == "edm-graph"] == ["reference", "eager-bf16", "torch.compile"]
    assert groups[0]["configs"] == ["edm-cifar10-ddpmpp", "multistage-cifar10-ddpmpp"]


@pytest.mark.parametrize("argv,match", [
    (["--backends", "triton"], "not 'triton'"), (["--backends", "auto"], "not 'auto'"),
    (["--configs", "tiny"], "unknown 'tiny'"), (["--configs", "multistage-tiny-ddpmpp"], "must be a SongUNet"),
    (["--heun-steps", "0"], "heun-steps must be >= 1")])
def test_bad_options_are_usage_errors(argv, match):
    with pytest.raises(SystemExit, match=match):
        _resolved(["--preset", "edm-cpu"] + argv, "cpu")


def _run(tmp_path, *extra):
    return latency.main(["--preset", "edm-cpu", "--heun-steps", "3", "--repeats", "2", "--warmup", "0",
                         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "edm.json"), *extra])


def test_rows_run_with_weighted_gflops_and_the_multistage_speedup(tmp_path):
    res = _run(tmp_path, "--backends", "reference")
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["EDM U-Net", "multistage U-Net"]
    assert all(r["status"] == "ok" and r["nfe"] == 5 and r["solver"] == "heun" for r in rows)
    torch.manual_seed(0)
    ref = weighted_gflops(build_edm_net(get_edm_config("multistage-tiny-ddpmpp")).eval(), HeunConfig(num_steps=3))
    ms = rows[1]
    assert ms["gflops_per_eval"] == pytest.approx(ref["gflops_per_eval"])
    assert ms["evals_per_stage"] == ref["evals_per_stage"] and sum(ms["evals_per_stage"]) == 5
    # the weighted mean is the stage GFLOPs averaged by the evaluations each stage runs
    mean = sum(n * g for n, g in zip(ms["evals_per_stage"], ms["gflops_per_stage"])) / 5
    assert ms["gflops_per_eval"] == pytest.approx(mean)
    assert ms["gflops_ratio"] == pytest.approx(rows[0]["gflops_per_eval"] / ms["gflops_per_eval"])
    assert rows[0]["speedup"] is None and ms["speedup"]["over"] == "EDM U-Net" and ms["speedup"]["point"] > 0
    stored = json.loads((tmp_path / "edm.json").read_text())
    assert len(stored["rows"]) == 2 and "gflops" in stored["statistics"]


def test_a_row_that_fails_says_why_and_bench_exits_1(tmp_path, monkeypatch):
    from duodiff_fast import cli

    real = edm_latency.prepare_edm_net

    def prepare(net, backend="reference", *a, **kw):
        if backend == "eager-bf16" and net.model.__class__.__name__ == "MultistageUNet":
            raise RuntimeError("no bf16 kernels for this test")
        return real(net, backend, *a, **kw)

    monkeypatch.setattr(edm_latency, "prepare_edm_net", prepare)
    res = _run(tmp_path, "--backends", "reference,eager-bf16")
    by = {(r["backend"], r["method"]): r for r in res["rows"]}
    failed = by[("eager-bf16", "multistage U-Net")]
    assert failed["status"] == "failed" and "no bf16 kernels for this test" in failed["error"]
    assert "in preparation" in failed["error"] and failed["speedup"] is None
    assert by[("eager-bf16", "EDM U-Net")]["status"] == "ok"
    assert by[("reference", "multistage U-Net")]["speedup"] is not None
    assert "FAILED: RuntimeError: no bf16 kernels" in edm_latency.format_edm_table(res["rows"])
    code = cli.main(["bench", "--preset", "edm-cpu", "--heun-steps", "2", "--repeats", "1", "--warmup", "0",
                     "--backends", "eager-bf16", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "b.json")])
    assert code == 1


def test_the_captured_group_code_path_runs(tmp_path):
    """The edm-graph rows' preparation and timing on a CPU (where the sampler runs its loop eagerly:
    the code path, not a capture; the capture itself is tested in tests/runtime/test_edm_graphs.py)."""
    args = _resolved(["--preset", "edm-cpu", "--heun-steps", "2", "--repeats", "1", "--warmup", "0",
                      "--backends", "reference", "--no-progress"], "cpu")
    runner = edm_latency._EDMRunner(args, torch.device("cpu"))
    group = dict(id="edm-graph/reference", kind="edm-graph", backend="reference",
                 configs=["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"])
    rows = runner.run_group(group)
    assert [r["method"] for r in rows] == ["EDM U-Net (graph)", "multistage U-Net (graph)"]
    assert all(r["status"] == "ok" for r in rows) and rows[1]["speedup"] is not None
