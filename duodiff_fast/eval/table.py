"""A paper-style results table: FID, time per sample and speedup per method; CSV, Markdown and a plot.

Rows are dicts with at least ``method`` (label), ``fid`` and ``time_per_sample_s``; :func:`add_speedups`
fills ``speedup`` = base time / row time (the row labelled ``base``; empty without one).
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from typing import Dict, List, Optional, Sequence

from ..io_utils import atomic_write, atomic_write_text

__all__ = ["COLUMNS", "EDM_COLUMNS", "EDM_MD_COLUMNS", "add_speedups", "write_csv", "markdown_table",
           "write_markdown", "write_plot", "ase_table", "write_ase_table"]

COLUMNS = ("method", "fid", "time_per_sample_s", "speedup", "n_samples", "solver", "steps", "settings", "smoke_check")
# The multistage paper's Tables 1/2 rows for EDM models: NFE and GFLOPs per evaluation (weighted by the
# evaluations in each stage) beside FID and time.
EDM_COLUMNS = ("method", "nfe", "gflops_per_eval", "fid", "time_per_sample_s", "evals_per_stage",
               "gflops_per_stage", "n_samples", "solver", "steps", "settings", "smoke_check")
EDM_MD_COLUMNS = ("method", "nfe", "gflops_per_eval", "fid", "time_per_sample_s")
_HEADS = {"method": "Method", "fid": "FID", "time_per_sample_s": "Time per sample (s)", "speedup": "Speedup",
          "nfe": "NFE", "gflops_per_eval": "GFLOPs"}


def add_speedups(rows: List[Dict[str, object]], base_label: str = "base") -> List[Dict[str, object]]:
    """Set each row's ``speedup`` (base time / its time); None when the grid has no base row."""
    base = next((r for r in rows if r["method"] == base_label), None)
    for r in rows:
        r["speedup"] = (float(base["time_per_sample_s"]) / float(r["time_per_sample_s"])
                        if base is not None and r.get("time_per_sample_s") else None)
    return rows


def _fmt(key: str, value) -> str:
    if value is None:
        return ""
    if key == "fid":
        return f"{value:.2f}"
    if key == "time_per_sample_s":
        return f"{value:.4g}"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "gflops_per_eval":
        return f"{value:.2f}"
    return str(value)


def write_csv(path: str, rows: Sequence[Dict[str, object]], columns: Sequence[str] = COLUMNS) -> None:
    """One line per method, full precision, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def markdown_table(rows: Sequence[Dict[str, object]], notes: Sequence[str] = (), title: str = "",
                   columns: Optional[Sequence[str]] = None) -> str:
    """The table as Markdown (FID 2 decimals, time 4 significant digits, speedup as 1.23x);
    ``columns`` default: method, FID, time, speedup (EDM_MD_COLUMNS for the EDM rows)."""
    cols = tuple(columns) if columns else ("method", "fid", "time_per_sample_s", "speedup")
    head = _HEADS
    lines = [f"# {title}", ""] if title else []
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines.append("| " + " | ".join(head[c] for c in cols) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def ase_table(rows: Sequence[Dict[str, object]], arch: str, sampler: str, notes: Sequence[str] = ()) -> str:
    """The ASE paper's Table 1 layout as Markdown: the base model and its D-n schedules, with FID
    and the acceleration (time saved against the base row, percent).

    Args:
        rows: table rows (``method`` "base" and "ase D3" style labels; other methods are left out).
        arch: the architecture's name in the labels ("DiT" -> rows "DiT", "D1-DiT", ...).
        sampler: the sampler heading, e.g. "DDPM-250".
    """
    base = next((r for r in rows if r["method"] == "base"), None)
    lines = [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [f"| Methods ({sampler}) | FID (lower is better) | Accel. (time saved) |", "|---|---:|---:|"]
    for r in rows:
        label = str(r["method"])
        if label == "base":
            name, accel = arch, "-"
        elif label.startswith("ase "):
            name = f"{label.split()[1]}-{arch}"
            t, t0 = r.get("time_per_sample_s"), base.get("time_per_sample_s") if base else None
            accel = f"{100.0 * (1.0 - float(t) / float(t0)):.2f}%" if t and t0 else ""
        else:
            continue
        fid = r.get("fid")
        lines.append(f"| {name} | {'' if fid is None else format(float(fid), '.3f')} | {accel} |")
    return "\n".join(lines) + "\n"


def write_ase_table(path: str, rows, arch: str, sampler: str, notes: Sequence[str] = ()) -> None:
    atomic_write_text(path, ase_table(rows, arch, sampler, notes))


def write_markdown(path: str, rows, notes: Sequence[str] = (), title: str = "",
                   columns: Optional[Sequence[str]] = None) -> None:
    atomic_write_text(path, markdown_table(rows, notes, title, columns))


def write_plot(path: str, rows: Sequence[Dict[str, object]], title: str = "", note: Optional[str] = None) -> None:
    """PNG scatter of FID against time per sample, one labelled point per method (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install 'duodiff-fast[eval]'") from e
    pts = [(float(r["time_per_sample_s"]), float(r["fid"]), str(r["method"])) for r in rows
           if r.get("fid") is not None and r.get("time_per_sample_s") is not None
           and math.isfinite(float(r["fid"]))]
    if not pts:
        raise ValueError("no row has both an FID and a time per sample to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        for x, y, label in pts:
            ax.scatter([x], [y], s=28)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("time per sample (s)")
        ax.set_ylabel("FID")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        if note:
            fig.text(0.5, 0.01, textwrap.fill(note, 80), ha="center", va="bottom", fontsize=8, color="crimson")
        fig.tight_layout(rect=(0, 0.08 if note else 0, 1, 1))
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
