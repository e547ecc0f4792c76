"""The GPU suite's summary writer (on synthetic JSON), kernels.py's preset, and gpu_suite.sh's shell checks."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest

from duodiff_fast.bench import summary
from duodiff_fast.bench.stats import speedup, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")


def _latency_json():
    base_t, duo_t = [1.0, 1.01, 0.99, 1.0, 1.0], [0.5, 0.5, 0.51, 0.49, 0.5]
    row = lambda method, t, **kw: dict(config="cifar10-s2", solver="ddim", steps=50, backend="eager-bf16",  # noqa: E731
                                       method=method, batch_size=64, status="ok", error=None,
                                       per_sample=summarize([x / 64 for x in t]), batch_seconds=summarize(t),
                                       unstable=False, **kw)
    base = row("base", base_t, speedup=None)
    duo = row("DuoDiff t_s=300", duo_t, speedup=dict(speedup(base_t, duo_t), unstable=False),
              layer_bound_speedup=1.4)
    shaky = row("DuoDiff t_s=500", duo_t, speedup=dict(speedup(base_t, duo_t), unstable=True))
    failed = dict(row("base graph", base_t), status="failed", error="RuntimeError: capture broke", per_sample=None)
    skipped = dict(row("ASE D1", base_t), status="skipped", error="budget of 200 s spent", per_sample=None)
    return dict(benchmark="latency", environment=dict(device="NVIDIA H100", torch="2.11", triton="3.6", cuda="12.8"),
                rows=[base, duo, shaky, failed, skipped])


def _kernels_json():
    return dict(benchmark="kernels", environment=dict(device="NVIDIA H100"),
                rooflines=dict(matmul_tflops=700.0, copy_gbps=3000.0),
                rows=[dict(op="qkv", shape=dict(config="imagenet256-l2", batch=128), flops=1e12,
                           peers={"triton": dict(ms=2.0, tflops=500.0, fraction_of_matmul_peak=0.71),
                                  "cublas+torch": dict(ms=2.5, tflops=400.0, fraction_of_matmul_peak=0.57),
                                  "torch.compile": dict(error="BackendCompilerFailed: x")}),
                      dict(op="forward", shape=dict(config="imagenet256-l2", batch=128), peers={},
                           skipped="budget of 150 s spent")])


def test_summary_table_from_synthetic_json(tmp_path):
    lat, ker = tmp_path / "latency.json", tmp_path / "kernels.json"
    lat.write_text(json.dumps(_latency_json()))
    ker.write_text(json.dumps(_kernels_json()))
    out = tmp_path / "sub" / "summary.md"
    assert summary.main([str(lat), str(ker), "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    assert any("DuoDiff t_s=300" in ln and "2.00x [" in ln and "layer bound 1.40x" in ln for ln in lines)
    shaky = [ln for ln in lines if "t_s=500" in ln][0]
    assert "unstable" in shaky and "x [" not in shaky
    assert any("FAILED: RuntimeError: capture broke" in ln for ln in lines)
    assert any("SKIPPED" in ln and "forward" in ln for ln in lines)
    assert any(ln.startswith("| qkv") and "triton: 2.000 ms" in ln and "cublas+torch" in ln and "0.80" in ln
               and "FAILED: torch.compile" in ln for ln in lines)
    assert "NVIDIA H100" in text and "triton 3.6" in text


def test_summary_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"benchmark": "other"}))
    with pytest.raises(ValueError, match="not a latency or kernels result"):
        summary.summarize_files([str(p)])


def test_kernels_preset_is_small_and_explicit_options_win():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import kernels
    finally:
        sys.path.pop(0)
    args = kernels.parse_args(["--preset", "gpu-suite"])
    groups = kernels.plan(args)
    assert args.budget and args.budget <= 180 and args.reps <= 20
    assert [(c, b) for c, b, _ in groups] == [("imagenet256-l2", 128), ("imagenet256-l2", 128)]
    assert groups[-1][2] == ["forward"] and args.forward_compile_mode == "default"
    assert kernels.parse_args(["--preset", "gpu-suite", "--reps", "3"]).reps == 3
    full = kernels.parse_args([])
    assert len(kernels.plan(full)) == 4 * 5 + 4 and not full.budget
    with pytest.raises(SystemExit):
        kernels.parse_args(["--ops", "warp_drive"])


def test_gpu_suite_script_parses_and_checks_its_arguments(tmp_path):
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", SUITE]).returncode == 0
    r = subprocess.run([bash, SUITE], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: benchmarks/gpu_suite.sh OUTDIR" in r.stderr


def test_gpu_suite_refuses_a_machine_without_a_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # a driver tool that finds no GPU
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    r = subprocess.run(["bash", SUITE, str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "no NVIDIA GPU visible" in r.stderr


def _suite_plan(tmp_path):
    """The suite's dry-run plan: ({stage name: (cap, argv)}, {stage name: JSON path}); runs nothing."""
    env = dict(os.environ, GPU_SUITE_DRY_RUN="1")
    r = subprocess.run(["bash", SUITE, str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    stages, jsons = {}, {}
    for line in r.stdout.splitlines():
        if line.startswith("PLAN|"):
            _, name, cap, cmd = line.split("|", 3)
            stages[name] = (int(cap), cmd)
        elif line.startswith("JSON|"):
            _, name, path = line.split("|", 2)
            jsons[name] = path
    return stages, jsons


def _bench_argv(cmd: str):
    import shlex

    argv = shlex.split(cmd)
    return argv[argv.index("benchmarks/latency.py") + 1:]


def test_gpu_suite_plan_fits_its_deadline_and_times_dit_and_edm(tmp_path):
    stages, jsons = _suite_plan(tmp_path)
    with open(SUITE) as f:
        deadline = int(re.search(r"GPU_SUITE_SECONDS:-(\d+)", f.read()).group(1))
    assert deadline < 9 * 60
    assert sum(cap for cap, _ in stages.values()) <= deadline - 5, stages  # caps, not the clamp, fit
    names = " ".join(stages)
    assert "--preset dit-xl2" in names and "--preset edm-cifar10" in names and "test suite" in names
    # every benchmark stage has its own JSON file, and they differ
    assert set(jsons) == {n for n in stages if n.startswith(("kernels.py", "latency.py"))}
    assert len(set(jsons.values())) == len(jsons) and all(p.endswith(".json") for p in jsons.values())
    for name, path in jsons.items():
        cap, cmd = stages[name]
        if "latency.py" in name:
            argv = _bench_argv(cmd)
            assert argv[argv.index("--out") + 1] == path
        if "--budget" in cmd:  # a budget below the cap: the JSON is written before the stage is killed
            budget = float(re.search(r"--budget (\S+)", cmd).group(1))
            assert budget <= cap - 15, (name, budget, cap)


def test_gpu_suite_dit_and_edm_stages_are_narrowed_and_parse(tmp_path):
    import torch

    from duodiff_fast.bench import edm_latency, latency

    stages, _ = _suite_plan(tmp_path)
    dit = next(cmd for n, (_, cmd) in stages.items() if "dit-xl2" in n)
    args = latency.resolve(latency.parse_args(_bench_argv(dit)), torch.device("cuda"))
    assert args.budget and args.budget > 0 and args.adadiff_thetas == "" and args.repeats <= 3
    groups = latency.plan(args, "cuda")
    full = latency.plan(latency.resolve(latency.parse_args(["--preset", "dit-xl2"]), torch.device("cuda")), "cuda")
    n_rows = sum(len(g["rows"]) for g in groups)
    assert 0 < n_rows < sum(len(g["rows"]) for g in full) / 3  # narrowed, not the whole preset
    assert all(g.get("config", "dit-xl2-256") == "dit-xl2-256" for g in groups)
    edm = next(cmd for n, (_, cmd) in stages.items() if "edm-cifar10" in n)
    eargs = edm_latency.resolve_edm(latency.parse_args(_bench_argv(edm)), torch.device("cuda"))
    assert "torch.compile" not in eargs.backends and eargs.heun_steps < 18 and eargs.repeats <= 3
    assert len(edm_latency.plan_edm(eargs)) == 4  # reference and eager-bf16, eager and graph groups
