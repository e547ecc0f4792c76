"""AdaDiff theta calibration: FLOP costs by hand, the bisection, and ``duodiff-fast calibrate``."""
import json

import pytest
import torch

from duodiff_fast.analysis.calibrate import calibrate_theta, exit_costs, flop_speedup, format_exit_table
from duodiff_fast.methods import AdaDiffUViT
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm


def _model(name="tiny"):
    torch.manual_seed(0)
    return AdaDiffUViT(create_model(name)).eval()


def test_exit_costs_by_hand():
    m = _model()  # tiny: 16x16x3, patch 2, width 64, depth 4 (1 in, mid, 1 out... N = 5), 4 heads
    c = exit_costs(m)
    D, T, L = 64, 64 + 1, 64  # 64 patches + the time token
    block = 2 * T * D * 3 * D + 2 * T * D * D + 4 * T * T * D + 4 * T * D * 4 * D
    skip = 2 * T * 2 * D * D
    n = m.num_layers
    assert len(c["layers"]) == n == 5
    assert c["layers"][0] == block and c["layers"][-1] == block + skip
    embed = 2 * L * 2 * 2 * 3 * D
    head = 2 * L * D * 2 * 2 * 3 + 2 * 256 * 3 * 3 * 9
    uem = 2 * 2 * D * 1
    assert c["embed"] == embed and c["head"] == head and c["uem"] == uem
    assert c["base"] == embed + sum(c["layers"]) + head
    assert c["by_exit"][0] == embed + uem + head
    assert c["by_exit"][n] == c["base"] + n * uem
    assert flop_speedup(torch.full((7,), n), c) == pytest.approx(c["base"] / (c["base"] + n * uem))
    mixed = torch.tensor([0, n, 2, 2])
    want = c["base"] / (sum(c["by_exit"][int(e)] for e in mixed) / 4)
    assert flop_speedup(mixed, c) == pytest.approx(want)


@pytest.mark.parametrize("target", [{"target_exit_layer": 3.0}, {"target_speedup": 1.5}])
def test_bisection_meets_the_target(target):
    m = _model()
    sched = linear_ddpm()
    res = calibrate_theta(m, sched, (8, 3, 16, 16), num_batches=1, num_steps=4, iterations=14, tolerance=0.05,
                          **target)
    assert res["achieved"], res["history"]
    if "target_exit_layer" in target:
        assert abs(res["mean_exit_layer"] - 3.0) <= 0.05
    else:
        assert res["speedup"] == pytest.approx(1.5, rel=0.05)
    # the reported theta reproduces its numbers (same seeds): rerun with one iteration at that theta
    thetas = [h["theta"] for h in res["history"]]
    assert res["theta"] in thetas and 0 < res["theta"] < 1
    assert res["rows"] and all(0 <= r["mean_exit"] <= m.num_layers for r in res["rows"])
    assert "mean exit" in format_exit_table(res["rows"], m.num_layers)


def test_bad_targets():
    m = _model()
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_theta(m, linear_ddpm(), (2, 3, 16, 16))
    with pytest.raises(ValueError, match=">= 1"):
        calibrate_theta(m, linear_ddpm(), (2, 3, 16, 16), target_speedup=0.5)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        calibrate_theta(m, linear_ddpm(), (2, 3, 16, 16), target_exit_layer=9)


def test_cli_calibrate(tmp_path, capsys):
    from duodiff_fast.cli import main
    from duodiff_fast.models import save_weights

    m = _model("tiny-cond")
    save_weights(m, tmp_path / "ada.pt")
    out = tmp_path / "cal.json"
    args = ["calibrate", "--config", "tiny-cond", "--adadiff-checkpoint", str(tmp_path / "ada.pt"),
            "--target-exit-layer", "3", "--tolerance", "0.1", "--batches", "1", "--batch-size", "3", "--steps", "3",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "exit trend at theta" in text and "mean exit" in text and "FLOP speedup" in text
    res = json.loads(out.read_text())
    assert res["config"] == "tiny-cond" and res["num_layers"] == 5 and res["rows"]
    assert res["target"] == {"exit_layer": 3.0} and 0 <= res["theta"] <= 1
    with pytest.raises(SystemExit) as e:  # the two targets exclude each other (argparse: exit 2)
        main(args + ["--target-speedup", "1.3"])
    assert e.value.code == 2
    assert main(args[:-2] + ["--batches", "0", "--out", str(out)]) == 2
