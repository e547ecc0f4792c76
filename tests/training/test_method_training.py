"""Every method's training: labels in the trainer, ``train --method``, and the README's examples as written.

The README blocks marked ``<!-- example: NAME -->`` are extracted and run on the class-conditional
``tiny-cond`` config with fewer steps (the only edits: step counts and batch sizes).
"""
import json
import os
import re
import shlex

import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.methods import AdaDiffObjective
from duodiff_fast.schedules import get_schedule
from duodiff_fast.training import DiffusionObjective, TrainConfig, Trainer

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
TRAIN_FAST = ["--steps", "2", "--batch-size", "4", "--no-progress", "--device", "cpu"]
SAMPLE_FAST = ["--steps", "2", "--n-samples", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"]
PY_FAST = [("steps=2000", "steps=2"), ("steps=1000", "steps=2"), ("batch_size=64", "batch_size=4"),
           ("num_steps=50", "num_steps=2"), ("num_steps=20", "num_steps=3")]


def readme_block(name: str) -> str:
    text = open(README).read()
    m = re.search(r"<!-- example: " + re.escape(name) + r"\b[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no example block {name!r}"
    return m.group(1)


# ---- labels and label dropout are the trainer's, for every objective -------------------------------------
class SeenLabels:
    """A custom loss that records the labels it is handed (and touches the weights for a gradient)."""

    def __init__(self):
        self.seen = []

    def __call__(self, model, x0, y, generator):
        self.seen.append(None if y is None else y.clone())
        loss = sum(p.sum() for p in model.parameters()) * 0.0
        return loss, {"loss": loss.detach()}


def _trainer(tmp_path, loss_fn, model="tiny-cond", p_uncond=0.5):
    cfg = TrainConfig(model=model, steps=1, batch_size=4, out_dir=str(tmp_path), progress=False, device="cpu",
                      p_uncond=p_uncond, resume=None)
    return Trainer(cfg, loss_fn=loss_fn)


def test_custom_loss_gets_dropped_labels(tmp_path):
    loss = SeenLabels()
    tr = _trainer(tmp_path, loss, p_uncond=0.3)
    y = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    tr.train_step(torch.zeros(4000, 3, 16, 16), y)
    seen = loss.seen[0]
    dropped = seen != y
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    assert bool((seen[dropped] == 10).all())  # the null class: num_classes - 1
    loss0 = SeenLabels()
    tr0 = _trainer(tmp_path / "b", loss0, p_uncond=0.0)
    tr0.train_step(torch.zeros(8, 3, 16, 16), y[:8])
    assert torch.equal(loss0.seen[0], y[:8])
    loss_u = SeenLabels()
    _trainer(tmp_path / "c", loss_u, model="tiny").train_step(torch.zeros(2, 3, 16, 16), y[:2])
    assert loss_u.seen == [None]  # unconditional models get no labels


def test_adadiff_objective_trains_a_conditional_model(tmp_path):
    """The README's ``AdaDiffObjective(schedule)`` on a class-conditional model (was: "needs labels y")."""
    from duodiff_fast.methods import AdaDiffUViT
    from duodiff_fast.models import create_model

    model = AdaDiffUViT(create_model("tiny-cond"), freeze_backbone=True)
    cfg = TrainConfig(model="tiny-cond", steps=1, batch_size=4, out_dir=str(tmp_path), progress=False, device="cpu",
                      resume=None)
    tr = Trainer(cfg, model=model, loss_fn=AdaDiffObjective(get_schedule("linear")))
    out = tr.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out["loss"]) and out["l_u"] >= 0


def test_objectives_that_drop_labels_themselves_are_refused(tmp_path):
    with pytest.raises(ValueError, match="drops labels itself"):
        _trainer(tmp_path, DiffusionObjective(get_schedule("linear"), 11, p_uncond=0.1))
    with pytest.raises(ValueError, match="drops labels itself"):
        _trainer(tmp_path, AdaDiffObjective(get_schedule("linear"), p_uncond=0.1))
    with pytest.raises(ValueError, match="num_classes=0"):
        _trainer(tmp_path, DiffusionObjective(get_schedule("linear"), num_classes=0))


# ---- the command line --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The README's train-methods block, run as written (fewer steps) in a fresh folder."""
    root = tmp_path_factory.mktemp("cli")
    here = os.getcwd()
    os.chdir(root)
    try:
        for line in readme_block("train-methods").strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "duodiff-fast"
            fast = TRAIN_FAST if argv[1] == "train" else SAMPLE_FAST
            assert main(argv[1:] + fast) == 0, line
    finally:
        os.chdir(here)
    return root


def test_readme_train_methods_block(cli_runs):
    runs = cli_runs / "runs"
    for f in ("ada/adadiff.pt", "ase/ase_D3.pt", "ms/multistage.pt", "full/latest.pt", "shallow/latest.pt"):
        assert (runs / f).is_file(), f
    full = json.loads((runs / "full" / "config.json").read_text())["model"]
    shallow = json.loads((runs / "shallow" / "config.json").read_text())["model"]
    assert shallow["depth"] == 2 and full["depth"] == 4
    # AdaDiff: the backbone stayed frozen (equal to the EMA weights it was loaded from)
    from duodiff_fast.models import load_model
    from duodiff_fast.models.checkpoint import extract_state_dict, read_checkpoint_file

    backbone = load_model(str(runs / "full" / "latest.pt"), "tiny-cond", use_ema=True).state_dict()
    ada = extract_state_dict(read_checkpoint_file(str(runs / "ada" / "adadiff.pt")))
    assert all(torch.equal(ada[f"backbone.{k}"], v) for k, v in backbone.items())
    assert any(k.startswith("uems.") for k in ada)
    for name in ("duodiff", "ada", "ase", "ms"):
        man = json.loads((cli_runs / "samples" / name / "manifest.json").read_text())
        assert man["count"] == 2


@pytest.mark.parametrize("block", ["adadiff-python", "ase-python"])
def test_readme_python_examples(cli_runs, block, monkeypatch):
    code = readme_block(block)
    for a, b in PY_FAST:
        code = code.replace(a, b)
    monkeypatch.chdir(cli_runs)
    scope = {}
    exec(compile(code, f"README:{block}", "exec"), scope)
    assert torch.isfinite(scope["images"]).all()


def test_cli_method_refusals(tmp_path, capsys):
    base = ["train", "--config", "tiny-cond", *TRAIN_FAST, "--out-dir", str(tmp_path / "r")]
    for extra, msg in ((["--method", "adadiff"], "--backbone"),
                       (["--method", "adadiff", "--shallow", "--backbone", "x"], "--shallow"),
                       (["--method", "ase", "--backbone", str(tmp_path)], "--ase-schedule"),
                       (["--ase-schedule", "D3"], "--ase-schedule"),
                       (["--method", "ase", "--schedule", "D3"], "noise schedule"),
                       (["--method", "adadiff", "--backbone", str(tmp_path / "none.pt")], "does not exist"),
                       (["--boundaries", "0.4"], "multistage")):
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
