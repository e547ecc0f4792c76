"""One short summary table from the benchmark JSON files (latency.py and kernels.py results).

    python -m duodiff_fast.bench.summary benchmarks/results/latency_*.json kernels_*.json --out summary.md

Latency rows: per-sample median, IQR and the speedup over their group's base with its interval
(unstable, failed and skipped rows say so instead of a figure). Kernel rows: the Triton kernel's
time and rate next to its fastest peer. Writes Markdown (``--out``) and prints the same table.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional, Sequence

__all__ = ["summarize_files", "latency_lines", "kernel_lines", "main"]


def _speed(r: dict) -> str:
    if r.get("status") not in (None, "ok"):
        return r.get("status", "?")
    sp = r.get("speedup")
    if not sp:
        return "-"
    if sp.get("unstable"):
        return "unstable"
    return f"{sp['point']:.2f}x [{sp['low']:.2f}-{sp['high']:.2f}]"


def latency_lines(data: dict) -> List[str]:
    env = data.get("environment", {})
    lines = [f"### latency ({env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda', '?')})", "",
             "| config | solver | backend | method | batch | ms/sample | IQR | speedup (95% CI) | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data.get("rows", []):
        ps = r.get("per_sample")
        med = f"{ps['median_s'] * 1e3:.3f}" if ps else (
            f"{r['estimate_per_sample_s'] * 1e3:.3f} (est.)" if r.get("estimate_per_sample_s") else "-")
        iqr = f"{ps['iqr_pct']:.1f}%" if ps else "-"
        note = ""
        if r.get("status") in ("failed", "skipped"):
            note = f"{r['status'].upper()}: {r.get('error')}"
        elif r.get("unstable") and r.get("status") == "ok":
            note = "UNSTABLE"
        if r.get("layer_bound_speedup"):
            note += f" layer bound {r['layer_bound_speedup']:.2f}x"
        if r.get("kernel_seconds"):
            note += f" kernels {r['kernel_seconds'] * 1e3:.2f} ms/batch"
        lines.append(f"| {r.get('config')} | {r.get('solver')}-{r.get('steps')} | {r.get('backend')} | {r.get('method')} | "
                     f"{r.get('batch_size')} | {med} | {iqr} | {_speed(r)} | {note.strip()} |")
    return lines


def kernel_lines(data: dict) -> List[str]:
    env = data.get("environment", {})
    roof = data.get("rooflines", {})
    lines = [f"### kernels ({env.get('device', '?')}; measured matmul peak {roof.get('matmul_tflops', float('nan')):.0f} "
             f"TFLOP/s, copy {roof.get('copy_gbps', float('nan')):.0f} GB/s)", "",
             "| op | shape | triton | best peer | triton / best peer time | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in data.get("rows", []):
        shape = " ".join(f"{k}={v}" for k, v in r.get("shape", {}).items())
        if r.get("skipped") or r.get("error"):
            lines.append(f"| {r['op']} | {shape} | - | - | - | {'SKIPPED: ' + r['skipped'] if r.get('skipped') else 'FAILED: ' + r['error']} |")
            continue
        peers = r.get("peers", {})
        ok = {k: v for k, v in peers.items() if "ms" in v}
        failed = [k for k, v in peers.items() if "error" in v]

        def rate(e):
            if "tflops" in e:
                return f"{e['ms']:.3f} ms, {e['tflops']:.0f} TF/s ({100 * e['fraction_of_matmul_peak']:.0f}% pk)"
            if "gbps" in e:
                return f"{e['ms']:.3f} ms, {e['gbps']:.0f} GB/s ({100 * e['fraction_of_copy_bw']:.0f}% bw)"
            return f"{e['ms']:.3f} ms"

        tri = [k for k in ok if k.startswith("triton")]
        others = {k: v for k, v in ok.items() if not k.startswith("triton")}
        t_name = min(tri, key=lambda k: ok[k]["ms"]) if tri else None
        best = min(others, key=lambda k: others[k]["ms"]) if others else None
        ratio = f"{ok[t_name]['ms'] / others[best]['ms']:.2f}" if t_name and best else "-"
        note = ("FAILED: " + ", ".join(failed)) if failed else ""
        lines.append(f"| {r['op']} | {shape} | {(t_name + ': ' + rate(ok[t_name])) if t_name else '-'} | "
                     f"{(best + ': ' + rate(others[best])) if best else '-'} | {ratio} | {note} |")
    return lines


def summarize_files(paths: Sequence[str]) -> str:
    """The Markdown summary of the given result files (kind read from each file's ``benchmark``)."""
    parts = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        kind = data.get("benchmark")
        if kind == "latency":
            parts.append("\n".join(latency_lines(data)))
        elif kind == "kernels":
            parts.append("\n".join(kernel_lines(data)))
        else:
            raise ValueError(f"{path}: not a latency or kernels result (benchmark={kind!r})")
        parts[-1] += f"\n\n(from `{os.path.basename(path)}`)"
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duodiff_fast.bench.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="result files of benchmarks/latency.py and benchmarks/kernels.py")
    p.add_argument("--out", action="append", default=[], help="write the Markdown table here (repeatable)")
    args = p.parse_args(argv)
    text = summarize_files(args.json)
    for out in args.out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
