"""The ahead-of-time sm_90 compile check (``python -m duodiff_fast.kernels.aot``), no GPU needed.

The full matrix (4 U-ViT widths and DiT-XL/2 x batch 1 and 256 x bfloat16 and float16, 216
distinct compilations) takes about 4.5 minutes with --jobs 2 on 2 cores, so pytest compiles a
representative subset that runs every kernel variant: H/2 at batch 256 in bfloat16 (head dim
72 = 64 + 16, 128-row attention tiles, class labels), S/2 at batch 1 in float16 (head dim 64,
64-row tiles, no labels) and DiT-XL/2 at batch 256 in bfloat16 (adaLN norm, tanh-GELU and gated
residual epilogues, 256 tokens without tails), every linear tuning candidate of every epilogue
included. The CLI runs the full matrix (.ci/run).
It runs in a subprocess: the check compiles GPU code, which TRITON_INTERPRET (set for the CPU
tests) forbids.
"""
import json
import os
import subprocess
import sys

import pytest


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "duodiff_fast.kernels.aot", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sm90_subset(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend (ptxas)")
    rows = []
    for subset in (("H/2", "256", "bf16"), ("S/2", "1", "fp16"), ("DiT-XL/2", "256", "bf16")):
        out = tmp_path_factory.mktemp("aot") / "rows.json"
        proc = _run("--workloads", subset[0], "--batches", subset[1], "--dtypes", subset[2], "--jobs", "2",
                    "--json", str(out))
        assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
        rows += [dict(r, rc=proc.returncode, table=proc.stdout) for r in json.loads(out.read_text())]
    return rows


def test_every_plan_maps_onto_its_kernel_arguments():
    """All launches of the full matrix are planned and their compile arguments checked (no compile)."""
    proc = _run("--plan-only", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distinct sm_90 compilations" in proc.stdout


def test_subset_compiles_without_spills_within_shared_memory(sm90_subset):
    bad = [r for r in sm90_subset if r["problems"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['config']} {r['flags']}: {r['problems']}" for r in bad)
    assert all(r["rc"] == 0 for r in sm90_subset)
    assert all(r["regs"] and r["regs"] <= 255 and r["spill_bytes"] == 0 for r in sm90_subset)
    kernels = {r["kernel"] for r in sm90_subset}
    assert kernels == {"attention_kernel", "linear_kernel", "layernorm_kernel", "adaln_layernorm_kernel",
                       "frontend_kernel", "final_layer_kernel"}
    dit = [r for r in sm90_subset if any(u.startswith("DiT-XL/2") for u in r["uses"])]
    flags = {r["flags"] for r in dit if r["kernel"] == "linear_kernel"}
    assert {"HAS_BIAS GELU_TANH", "HAS_BIAS HAS_RES HAS_GATE"} <= flags, flags


def test_matmul_kernels_use_wgmma(sm90_subset):
    """Every dot-bearing kernel (attention included: 64/128-row tiles) runs Hopper's wgmma."""
    for r in sm90_subset:
        if r["kernel"] not in ("layernorm_kernel", "adaln_layernorm_kernel"):
            assert r["mma"] == "wgmma", (r["kernel"], r["config"], r["mma"])


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "duodiff_fast.kernels.aot", "--plan-only"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
