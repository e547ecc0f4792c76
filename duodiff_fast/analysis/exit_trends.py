"""Early-exit trends: per-timestep exit statistics, the paper's figure 1, and a t_s proposal.

Exit layers are AdaDiff's layer counts (see :mod:`duodiff_fast.methods.adadiff`): 0 .. N, N = the
full network. Time is reported both as continuous t in (0, 1] and as the step position
p = ``schedule.step_position(t)`` on the 1000-step axis (t * 1000 when no schedule is given), the
x axis of the DuoDiff paper's figure 1 and the axis on which DuoDiff's t_s counts.

    rec = ExitRecorder()
    AdaDiff(model, schedule, theta, recorder=rec)  ->  sample(...)
    rows = exit_stats(rec, schedule)                 # one row per distinct t
    write_stats_csv(rows, "exits.csv"); plot_exit_trends({"theta=0.07": rows}, "exits.png", N)
    propose_switch_point(rows, N)                    # {"t_s": ..., ...}

The PNG is drawn with Pillow (a core dependency), so no plotting package is needed.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "ExitRecorder",
    "exit_stats",
    "write_stats_csv",
    "read_stats_csv",
    "plot_exit_trends",
    "propose_switch_point",
    "CSV_FIELDS",
    "collect_exit_stats",
    "main",
]

CSV_FIELDS = ("t", "position", "count", "mean_exit", "std_exit", "min_exit", "max_exit", "num_layers")


class ExitRecorder:
    """Collects (t, exit layer) for every row of every denoiser call during sampling.

    ``record(t (B,), exit_layers (B,))`` is what :class:`~duodiff_fast.methods.AdaDiff` calls.
    ``num_layers`` (N) may be given for the CSV; otherwise it is left as recorded (-1).
    """

    def __init__(self, num_layers: int = -1):
        self.num_layers = int(num_layers)
        self.t: List[torch.Tensor] = []
        self.exits: List[torch.Tensor] = []

    def record(self, t: torch.Tensor, exit_layers: torch.Tensor) -> None:
        t = t.detach().reshape(-1).to("cpu", torch.float64)
        e = exit_layers.detach().reshape(-1).to("cpu", torch.long)
        if t.numel() == 1 and e.numel() > 1:
            t = t.expand(e.numel())
        if t.shape != e.shape:
            raise ValueError(f"t {tuple(t.shape)} and exit_layers {tuple(e.shape)} must have one entry per row")
        self.t.append(t.clone())
        self.exits.append(e.clone())

    def clear(self) -> None:
        self.t.clear()
        self.exits.clear()

    def __len__(self) -> int:
        return sum(int(e.numel()) for e in self.exits)

    def mean_exit(self) -> float:
        """Mean exit layer over every recorded row (NaN when nothing was recorded)."""
        if not self.exits:
            return float("nan")
        return float(torch.cat(self.exits).double().mean())

    def tensors(self):
        """All records as (t (R,) float64, exits (R,) int64)."""
        if not self.t:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.t), torch.cat(self.exits)


def exit_stats(recorder: ExitRecorder, schedule=None, num_layers: Optional[int] = None) -> List[dict]:
    """One row per distinct t, ordered from the noisiest (largest t) down, as the sampler visits them.

    Row keys are :data:`CSV_FIELDS`: t, position (step position on the 1000-step axis), count,
    mean_exit, std_exit (population std over the rows at that t), min_exit, max_exit, num_layers.
    """
    t, e = recorder.tensors()
    n = recorder.num_layers if num_layers is None else int(num_layers)
    rows = []
    if t.numel() == 0:
        return rows
    values, inverse = torch.unique(t, return_inverse=True)
    if schedule is not None:
        positions = schedule.step_position(values).double()
    else:
        positions = values * 1000.0
    for k in range(values.numel() - 1, -1, -1):
        sel = e[inverse == k].double()
        rows.append(dict(t=float(values[k]), position=float(positions[k]), count=int(sel.numel()),
                         mean_exit=float(sel.mean()), std_exit=float(sel.std(unbiased=False)),
                         min_exit=int(sel.min()), max_exit=int(sel.max()), num_layers=n))
    return rows


def write_stats_csv(rows: Sequence[dict], path: str) -> str:
    """Write the rows of :func:`exit_stats` as CSV (header :data:`CSV_FIELDS`); returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_FIELDS})
    os.replace(tmp, path)
    return path


def read_stats_csv(path: str) -> List[dict]:
    """Read a CSV written by :func:`write_stats_csv` back into rows (numbers parsed)."""
    ints = {"count", "min_exit", "max_exit", "num_layers"}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(CSV_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path!r} is not an exit-statistics CSV: missing columns {sorted(missing)}")
        return [{k: (int(r[k]) if k in ints else float(r[k])) for k in CSV_FIELDS} for r in reader]


# ------------------------------------------------------------------------------------- the plot
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]


def plot_exit_trends(series: Dict[str, Sequence[dict]], path: str, num_layers: Optional[int] = None,
                     horizon: float = 1000.0, size=(640, 400), title: str = "AdaDiff exit layer vs t") -> str:
    """Draw mean exit layer (line) +- std (shaded band) against step position, one line per series.

    The paper's figure 1: x is the step position t in [0, horizon] (1000 = pure noise on the
    right), y the exit layer in [0, N]. Drawn with Pillow; returns ``path``.
    """
    from PIL import Image, ImageDraw

    if not series:
        raise ValueError("nothing to plot: series is empty")
    if num_layers is None:
        num_layers = max(max((r["num_layers"] for r in rows), default=-1) for rows in series.values())
        if num_layers <= 0:
            num_layers = max(max((r["max_exit"] for r in rows), default=1) for rows in series.values())
    w, h = size
    left, right, top, bottom = 56, 16, 30, 44
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img, "RGBA")

    def px(position: float, layer: float):
        x = left + (w - left - right) * position / horizon
        y = h - bottom - (h - top - bottom) * layer / max(num_layers, 1)
        return x, y

    # axes, ticks and labels
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for k in range(6):
        pos = horizon * k / 5
        x, _ = px(pos, 0)
        draw.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
        draw.text((x - 10, h - bottom + 6), f"{pos:g}", fill=(0, 0, 0))
    step = max(1, int(math.ceil(num_layers / 8)))
    for layer in range(0, num_layers + 1, step):
        _, y = px(0, layer)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.line([left, y, w - right, y], fill=(230, 230, 230))
        draw.text((left - 26, y - 6), f"{layer}", fill=(0, 0, 0))
    draw.text(((w - 60) // 2, h - 16), "t (step)", fill=(0, 0, 0))
    draw.text((4, top - 22), "exit layer", fill=(0, 0, 0))
    draw.text((left + 80, 6), title, fill=(0, 0, 0))

    for k, (label, rows) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = sorted(rows, key=lambda r: r["position"])
        if not pts:
            continue
        upper = [px(r["position"], min(num_layers, r["mean_exit"] + r["std_exit"])) for r in pts]
        lower = [px(r["position"], max(0.0, r["mean_exit"] - r["std_exit"])) for r in pts]
        if len(pts) > 1:
            draw.polygon(upper + lower[::-1], fill=color + (50,))
            draw.line([px(r["position"], r["mean_exit"]) for r in pts], fill=color, width=2)
        else:
            x, y = px(pts[0]["position"], pts[0]["mean_exit"])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.line([w - right - 150, top + 10 + 14 * k, w - right - 130, top + 10 + 14 * k], fill=color, width=2)
        draw.text((w - right - 125, top + 4 + 14 * k), str(label), fill=(0, 0, 0))

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------- the t_s proposal
def propose_switch_point(rows: Sequence[dict], num_layers: Optional[int] = None,
                         horizon: int = 1000) -> dict:
    """Propose DuoDiff's switch point t_s from the exit statistics.

    The mean exit layer m(p) against step position p is fitted, by least squares over the
    recorded positions (each weighted by its sample count), with a two-level step: level a for
    p > b (the early, noisy steps) and level c for p <= b. The boundary b minimising the squared
    error is chosen among the midpoints between recorded positions (and the two ends); DuoDiff
    then runs its shallow model where p > b, i.e. ``t_s = round(horizon - b)`` steps. If the
    early level is not below the late level (no jump towards the full depth) t_s = 0; if one
    level fits best (no jump at all), t_s = horizon when that level is below N - 0.5, else 0.

    Returns a dict: t_s, boundary (b), early_level (a), late_level (c), jump (c - a; None, like a
    missing level, when one level fits best), sse,
    num_layers, and shallow_layers_hint = ceil(a) (how many layers the early phase needs; DuoDiff's
    shallow backbone has 3).
    """
    pts = sorted(rows, key=lambda r: r["position"])
    if not pts:
        raise ValueError("no exit statistics to analyse")
    if num_layers is None:
        num_layers = max(r.get("num_layers", -1) for r in pts)
    p = [float(r["position"]) for r in pts]
    m = [float(r["mean_exit"]) for r in pts]
    wts = [float(max(r.get("count", 1), 1)) for r in pts]
    n = len(pts)

    # prefix sums so that every split costs O(1)
    def prefix(vals):
        out = [0.0]
        for v in vals:
            out.append(out[-1] + v)
        return out

    sw, swm, swm2 = prefix(wts), prefix([wi * mi for wi, mi in zip(wts, m)]), prefix([wi * mi * mi for wi, mi in zip(wts, m)])

    def sse(i, j):  # rows i..j-1 around their weighted mean
        wsum = sw[j] - sw[i]
        if wsum == 0:
            return 0.0, float("nan")
        mean = (swm[j] - swm[i]) / wsum
        return (swm2[j] - swm2[i]) - wsum * mean * mean, mean

    best = None
    for k in range(n + 1):  # rows [0, k) are late (p <= b), rows [k, n) early (p > b)
        late_err, late = sse(0, k)
        early_err, early = sse(k, n)
        err = late_err + early_err
        if k == 0:
            b = min(0.0, p[0] - 1e-9)
        elif k == n:
            b = float(horizon)
        else:
            b = 0.5 * (p[k - 1] + p[k])
        cand = (err, k, b, early, late)
        if best is None or err < best[0] - 1e-12:
            best = cand
    err, k, b, early, late = best
    if 0 < k < n:
        # a jump: DuoDiff's switch when the early phase is the shallower one, else no switch
        t_s = int(round(horizon - b)) if early < late else 0
    else:
        # one level fits best (no jump): the shallow model everywhere when that level is well
        # below the full depth, else nowhere
        level = sse(0, n)[1]
        full = num_layers if num_layers and num_layers > 0 else max(r["max_exit"] for r in pts)
        t_s = int(horizon) if level < full - 0.5 else 0
        b = 0.0 if t_s else float(horizon)
    t_s = max(0, min(int(horizon), int(t_s)))
    # None, not NaN, where a level is undefined: the result is written as JSON, which has no NaN
    jump = (late - early) if (early == early and late == late) else None
    return dict(t_s=t_s, boundary=float(b), early_level=float(early) if early == early else None,
                late_level=float(late) if late == late else None, jump=jump, sse=float(err),
                num_layers=num_layers,
                shallow_layers_hint=int(math.ceil(early)) if early == early else None)


# ------------------------------------------------------------------------------ collect and CLI
def collect_exit_stats(model, schedule, thetas: Sequence[float], shape, solver: str = "ddim",
                       num_steps: Optional[int] = None, y=None, base_seed: int = 0, device=None,
                       guidance_scale: float = 0.0) -> Dict[float, List[dict]]:
    """Sample one batch per theta with the shrinking-batch AdaDiff and return {theta: stats rows}.

    Args:
        model: an :class:`~duodiff_fast.methods.AdaDiffUViT` in eval mode.
        schedule: its noise schedule; shape: (B, C, H, W); y: (B,) labels for conditional models.
        guidance_scale: > 0 wraps the denoiser in classifier-free guidance (cond and uncond rows
            both counted).
    """
    from ..methods.adadiff import AdaDiff
    from ..samplers import ClassifierFreeGuidance, sample

    out: Dict[float, List[dict]] = {}
    for theta in thetas:
        rec = ExitRecorder(model.num_layers)
        den = AdaDiff(model, schedule, theta, recorder=rec)
        if guidance_scale > 0:
            den = ClassifierFreeGuidance(den, guidance_scale, model.null_class)
        with torch.inference_mode():
            sample(den, schedule, shape, solver=solver, num_steps=num_steps, y=y, base_seed=base_seed,
                   device=device, progress=False)
        out[float(theta)] = exit_stats(rec, schedule, model.num_layers)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``python -m duodiff_fast.analysis.exit_trends STATS.csv [...] [--png OUT.png]``: read exit
    statistics, print the proposed DuoDiff switch point of each file and optionally draw figure 1."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("csv", nargs="+", help="exit statistics written by write_stats_csv")
    p.add_argument("--png", default=None, help="draw the files' mean exit layer against t here")
    p.add_argument("--horizon", type=int, default=1000, help="steps on the DuoDiff t_s axis (default 1000)")
    args = p.parse_args(argv)
    series, proposals = {}, {}
    for path in args.csv:
        rows = read_stats_csv(path)
        label = os.path.splitext(os.path.basename(path))[0]
        series[label] = rows
        proposals[label] = propose_switch_point(rows, horizon=args.horizon)
        print(f"{label}: proposed t_s = {proposals[label]['t_s']} "
              f"(early mean exit {proposals[label]['early_level']}, late {proposals[label]['late_level']})")
    if args.png:
        plot_exit_trends(series, args.png, horizon=args.horizon)
        print(f"wrote {args.png}")
    print(json.dumps(proposals, indent=1, allow_nan=False))  # strict JSON: never NaN
    return proposals


if __name__ == "__main__":
    main()
