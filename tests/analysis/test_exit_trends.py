"""Exit-trend analysis: recorder statistics, CSV round trip, the PNG figure and the t_s proposal."""
import math

import pytest
import torch
from PIL import Image

from duodiff_fast.analysis import (
    CSV_FIELDS,
    ExitRecorder,
    exit_stats,
    plot_exit_trends,
    propose_switch_point,
    read_stats_csv,
    write_stats_csv,
)
from duodiff_fast.schedules import get_schedule


def step_rows(switch=600, early=2.0, full=13, positions=range(20, 1001, 20), std=0.3):
    """Figure-1-like statistics: mean exit `early` above position `switch`, `full` below."""
    return [dict(t=p / 1000, position=float(p), count=8, mean_exit=early if p > switch else float(full),
                 std_exit=std if p > switch else 0.0, min_exit=1, max_exit=full, num_layers=full)
            for p in positions]


def test_recorder_statistics_per_timestep():
    rec = ExitRecorder(num_layers=5)
    rec.record(torch.tensor([0.9, 0.9, 0.9]), torch.tensor([1, 2, 3]))
    rec.record(torch.tensor([0.1]), torch.tensor([5, 5]))  # one t for the whole batch
    rec.record(torch.tensor([0.9]), torch.tensor([2]))
    assert len(rec) == 6 and rec.mean_exit() == pytest.approx(18 / 6)
    rows = exit_stats(rec)
    assert [r["t"] for r in rows] == pytest.approx([0.9, 0.1])  # noisiest first
    assert rows[0]["count"] == 4 and rows[0]["mean_exit"] == pytest.approx(2.0)
    assert rows[0]["std_exit"] == pytest.approx(math.sqrt(0.5))
    assert rows[0]["min_exit"] == 1 and rows[0]["max_exit"] == 3 and rows[0]["num_layers"] == 5
    assert rows[1]["mean_exit"] == 5 and rows[1]["std_exit"] == 0
    assert rows[0]["position"] == pytest.approx(900)
    sched = exit_stats(rec, get_schedule("linear"))
    assert sched[0]["position"] == pytest.approx(900) and sched[1]["position"] == pytest.approx(100)
    with pytest.raises(ValueError):
        rec.record(torch.tensor([0.1, 0.2]), torch.tensor([1, 2, 3]))


def test_csv_round_trip(tmp_path):
    rows = step_rows()
    path = write_stats_csv(rows, str(tmp_path / "sub" / "exits.csv"))
    header = open(path).readline().strip().split(",")
    assert tuple(header) == CSV_FIELDS
    back = read_stats_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(back, rows):
        for k in CSV_FIELDS:
            assert a[k] == pytest.approx(b[k])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_stats_csv(str(bad))


def test_png_written(tmp_path):
    path = plot_exit_trends({"theta=0.05": step_rows(switch=500), "theta=0.09": step_rows(switch=700)},
                            str(tmp_path / "fig" / "exits.png"))
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 400)
    colors = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # both series' lines are drawn
    single = plot_exit_trends({"one": step_rows(positions=[500])}, str(tmp_path / "one.png"), num_layers=13)
    assert Image.open(single).size == (640, 400)
    with pytest.raises(ValueError):
        plot_exit_trends({}, str(tmp_path / "none.png"))


@pytest.mark.parametrize("switch", [300, 600, 880])
def test_switch_point_from_a_step(switch):
    result = propose_switch_point(step_rows(switch=switch))
    assert result["t_s"] == pytest.approx(1000 - switch, abs=10)  # positions are 20 apart
    assert result["early_level"] == pytest.approx(2.0) and result["late_level"] == pytest.approx(13.0)
    assert result["shallow_layers_hint"] == 2


def test_switch_point_noisy_and_degenerate_cases():
    g = torch.Generator().manual_seed(0)
    rows = step_rows(switch=400)
    for r in rows:
        r["mean_exit"] = min(13.0, max(0.0, r["mean_exit"] + float(torch.randn((), generator=g)) * 0.8))
    assert propose_switch_point(rows)["t_s"] == pytest.approx(600, abs=40)
    # the full network everywhere: no shallow phase
    assert propose_switch_point(step_rows(switch=1000))["t_s"] == 0
    # early exits everywhere: the shallow model for every step
    assert propose_switch_point(step_rows(switch=0))["t_s"] == 1000
    # exits get *earlier* later in the process: no DuoDiff switch
    flipped = step_rows(switch=500)
    for r in flipped:
        r["mean_exit"] = 15.0 - r["mean_exit"]
    assert propose_switch_point(flipped)["t_s"] == 0
    with pytest.raises(ValueError):
        propose_switch_point([])


def test_end_to_end_with_sampling(tmp_path):
    from duodiff_fast.methods import AdaDiff, AdaDiffUViT
    from duodiff_fast.methods.adadiff import set_synthetic_exit_profile
    from duodiff_fast.models import create_model
    from duodiff_fast.samplers import sample

    torch.set_num_threads(1)
    schedule = get_schedule("linear")
    torch.manual_seed(0)
    model = set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")).eval(), schedule, t_switch=0.6)
    rec = ExitRecorder(model.num_layers)
    with torch.inference_mode():
        sample(AdaDiff(model, schedule, 0.07, recorder=rec), schedule, (2, 3, 16, 16), solver="ddim",
               num_steps=20, progress=False)
    rows = exit_stats(rec, schedule)
    assert len(rows) == 20 and sum(r["count"] for r in rows) == 40
    write_stats_csv(rows, str(tmp_path / "exits.csv"))
    plot_exit_trends({"theta=0.07": read_stats_csv(str(tmp_path / "exits.csv"))}, str(tmp_path / "exits.png"))
    proposal = propose_switch_point(rows, model.num_layers)
    assert proposal["t_s"] == pytest.approx(400, abs=60)
    assert proposal["early_level"] == pytest.approx(2.0, abs=0.5)


def test_collect_with_cfg_and_command_line(tmp_path, capsys):
    from duodiff_fast.analysis import collect_exit_stats
    from duodiff_fast.analysis.exit_trends import main
    from duodiff_fast.methods import AdaDiffUViT
    from duodiff_fast.methods.adadiff import set_synthetic_exit_profile
    from duodiff_fast.models import create_model

    torch.set_num_threads(1)
    schedule = get_schedule("linear")
    torch.manual_seed(0)
    model = set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny-cond")).eval(), schedule, t_switch=0.5)
    stats = collect_exit_stats(model, schedule, [0.05, 0.09], (2, 3, 16, 16), solver="ddim", num_steps=10,
                               y=torch.tensor([1, 2]), guidance_scale=1.0)
    assert set(stats) == {0.05, 0.09}
    assert all(r["count"] == 4 for r in stats[0.09])  # cond + uncond rows of 2 samples
    paths = [write_stats_csv(rows, str(tmp_path / f"theta{th}.csv")) for th, rows in stats.items()]
    proposals = main([*paths, "--png", str(tmp_path / "fig1.png")])
    assert Image.open(tmp_path / "fig1.png").format == "PNG"
    assert set(proposals) == {"theta0.05", "theta0.09"}
    assert proposals["theta0.09"]["t_s"] == pytest.approx(500, abs=110)
    assert "proposed t_s" in capsys.readouterr().out


def test_module_run_has_no_runpy_warning_and_flat_profile_gives_strict_json(tmp_path):
    """`python -m duodiff_fast.analysis.exit_trends` on a flat profile: no sys.modules
    RuntimeWarning, and the printed JSON has no NaN (jump is null when there is no jump)."""
    import json
    import os
    import subprocess
    import sys

    flat = [dict(r, mean_exit=13.0, std_exit=0.0) for r in step_rows()]
    path = write_stats_csv(flat, str(tmp_path / "flat.csv"))
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "duodiff_fast.analysis.exit_trends",
                        path], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr and "sys.modules" not in r.stderr
    payload = r.stdout[r.stdout.index("{"):]
    assert "NaN" not in payload
    data = json.loads(payload, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["flat"]["t_s"] == 0 and data["flat"]["jump"] is None


def test_flat_profile_proposal_has_no_nan():
    res = propose_switch_point([dict(r, mean_exit=3.0) for r in step_rows()], 13)
    assert res["t_s"] == 1000 and res["jump"] is None  # a low flat level: shallow everywhere
    assert all(not (isinstance(v, float) and v != v) for v in res.values())


def test_package_names_still_import_lazily():
    import duodiff_fast.analysis as analysis

    assert analysis.ExitRecorder is ExitRecorder and "propose_switch_point" in dir(analysis)
    with pytest.raises(AttributeError):
        analysis.not_a_name  # noqa: B018
