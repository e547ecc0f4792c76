"""Method factory: grid parsing and every method built from checkpoints through the public constructors."""
import json

import numpy as np
import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.methods import (AdaDiff, AdaDiffUViT, ASEDenoiser, DuoDiff, ModelDenoiser, MultistageDenoiser,
                                  MultistageUViT, load_multistage, save_multistage)
from duodiff_fast.methods.factory import (MethodSpec, MethodWeights, build_method, parse_ase_checkpoints,
                                          parse_method_grid)
from duodiff_fast.models import create_model, save_weights
from duodiff_fast.models.checkpoint import CheckpointError
from duodiff_fast.schedules import get_schedule

SCHED = get_schedule("linear")


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.tensor([0.9, 0.5, 0.1])


def test_grid_parsing():
    specs = parse_method_grid("base, duodiff:300/500 ,adadiff:0.05,ase:all,multistage")
    assert [s.label for s in specs] == ["base", "duodiff t_s=300", "duodiff t_s=500", "adadiff theta=0.05",
                                        "ase D1", "ase D2", "ase D3", "ase D4", "ase D5", "ase D6", "multistage"]
    assert [s.slug for s in specs][:4] == ["base", "duodiff-ts300", "duodiff-ts500", "adadiff-theta0.05"]
    assert parse_method_grid("ase:d3-U-ViT")[0].ase_schedule == "D3"
    for bad, msg in [("nope", "unknown method"), ("duodiff", "needs a value"), ("duodiff:abc", "bad DuoDiff"),
                     ("adadiff:2", "theta in \\[0, 1\\]"), ("ase:D9", "D1, D2"), ("base:1", "takes no value"),
                     ("base,base", "repeats"), (" , ", "empty"), ("duodiff:0", "t_s > 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_method_grid(bad)
    with pytest.raises(ValueError, match="AdaDiff setting"):
        MethodSpec("base", theta=0.1)


def test_every_method_builds_with_random_weights():
    w = MethodWeights(random=True, seed=3)
    kinds = {"base": ModelDenoiser, "duodiff": DuoDiff, "adadiff": AdaDiff, "ase": ASEDenoiser,
             "multistage": MultistageDenoiser}
    x, t = _inputs()
    for spec in parse_method_grid("base,duodiff:400,adadiff:0.3,ase:D2,multistage"):
        built = build_method(spec, "tiny", w, SCHED, "cpu")
        assert type(built.denoiser) is kinds[spec.method]
        eps = built.denoiser(x, t)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        assert built.checkpoints == {}
    ase = build_method(MethodSpec("ase", ase_schedule="D1"), "tiny", w, SCHED, "cpu")
    # tiny has 2 out-blocks: the paper's D1 (6,5,4,3,2) rescaled to them
    assert ase.details["ase_kept"] == [2, 2, 1, 1, 1] and ase.denoiser.dropping.kept == (2, 2, 1, 1, 1)


def test_missing_weights_name_the_flag():
    for spec, flag in [(MethodSpec("base"), "--checkpoint"), (MethodSpec("duodiff", t_s=300), "--checkpoint"),
                       (MethodSpec("adadiff", theta=0.1), "--adadiff-checkpoint"),
                       (MethodSpec("multistage"), "--multistage-checkpoint")]:
        with pytest.raises(ValueError, match=flag):
            build_method(spec, "tiny", MethodWeights(), SCHED, "cpu")


def test_base_and_duodiff_from_checkpoints_match_direct_construction(tmp_path):
    torch.manual_seed(1)
    full, shallow = create_model("tiny").eval(), create_model("tiny-shallow").eval()
    save_weights(full, tmp_path / "full.pth")
    save_weights(shallow, tmp_path / "shallow.safetensors")
    w = MethodWeights(full=str(tmp_path / "full.pth"), shallow=str(tmp_path / "shallow.safetensors"))
    built = build_method(MethodSpec("duodiff", t_s=500), "tiny", w, SCHED, "cpu")
    assert built.checkpoints == {"full": w.full, "shallow": w.shallow}
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(built.denoiser(x, t), DuoDiff(shallow, full, SCHED, 500)(x, t))


def _trained_adadiff(hidden=0):
    torch.manual_seed(2)
    model = AdaDiffUViT(create_model("tiny"), uem_hidden=hidden).eval()
    with torch.no_grad():  # make heads and UEMs differ from their initialisation
        for p in list(model.heads.parameters()) + list(model.uems.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("hidden", [0, 8])
def test_adadiff_from_trainer_checkpoint(tmp_path, hidden):
    model = _trained_adadiff(hidden)
    path = tmp_path / "ada.pt"
    torch.save({"model_state_dict": model.state_dict(), "step": 3}, path)  # the trainer's layout
    built = build_method(MethodSpec("adadiff", theta=0.45), "tiny", MethodWeights(adadiff=str(path)), SCHED, "cpu")
    assert built.checkpoints == {"adadiff": str(path)}
    x, t = _inputs()
    with torch.no_grad():
        want = AdaDiff(model, SCHED, 0.45)(x, t)
        torch.testing.assert_close(built.denoiser(x, t), want)


def test_adadiff_heads_only_checkpoint_takes_the_full_backbone(tmp_path):
    model = _trained_adadiff()
    save_weights(model.backbone, tmp_path / "full.pth")
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    torch.save(heads, tmp_path / "heads.pt")
    w = MethodWeights(full=str(tmp_path / "full.pth"), adadiff=str(tmp_path / "heads.pt"))
    built = build_method(MethodSpec("adadiff", theta=0.45, adadiff_mode="simulated"), "tiny", w, SCHED, "cpu")
    assert set(built.checkpoints) == {"full", "adadiff"}
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(built.denoiser(x, t), AdaDiff(model, SCHED, 0.45, mode="simulated")(x, t))
    # a U-ViT file is not an AdaDiff checkpoint; a wrong config is a key/shape report
    with pytest.raises(CheckpointError, match="plain U-ViT"):
        build_method(MethodSpec("adadiff", theta=0.1), "tiny", MethodWeights(adadiff=str(tmp_path / "full.pth")),
                     SCHED, "cpu")
    torch.save(model.state_dict(), tmp_path / "ada.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        build_method(MethodSpec("adadiff", theta=0.1), "tiny-cond", MethodWeights(adadiff=str(tmp_path / "ada.pt")),
                     SCHED, "cpu")


def test_ase_and_multistage_from_checkpoints(tmp_path):
    torch.manual_seed(4)
    base, tuned = create_model("tiny").eval(), create_model("tiny").eval()
    save_weights(base, tmp_path / "base.pth")
    save_weights(tuned, tmp_path / "d3.pth")
    ase = parse_ase_checkpoints([f"D3={tmp_path / 'd3.pth'}"])
    w = MethodWeights(full=str(tmp_path / "base.pth"), ase=ase)
    x, t = _inputs()
    d3 = build_method(MethodSpec("ase", ase_schedule="D3"), "tiny", w, SCHED, "cpu")
    d1 = build_method(MethodSpec("ase", ase_schedule="D1"), "tiny", w, SCHED, "cpu")
    assert d3.checkpoints == {"ase": str(tmp_path / "d3.pth")} and d1.checkpoints == {"full": w.full}
    with torch.no_grad():
        kept = d3.denoiser.dropping
        torch.testing.assert_close(d3.denoiser(x, t), ASEDenoiser(tuned, SCHED, kept)(x, t))
    assert parse_ase_checkpoints(["a.pth", "d2=b.pth"]) == {"*": "a.pth", "D2": "b.pth"}
    with pytest.raises(ValueError, match="D7"):
        parse_ase_checkpoints(["D7=x"])

    ms = MultistageUViT.from_uvit(create_model("tiny"), boundaries=[0.3, 0.7]).eval()
    with torch.no_grad():
        for p in ms.stages[2].parameters():
            p.add_(0.1)
    save_multistage(ms, str(tmp_path / "ms.pt"))
    built = build_method(MethodSpec("multistage"), "tiny", MethodWeights(multistage=str(tmp_path / "ms.pt")),
                         SCHED, "cpu")
    with torch.no_grad():
        want = MultistageDenoiser(load_multistage(str(tmp_path / "ms.pt")).eval(), SCHED)(x, t)
        torch.testing.assert_close(built.denoiser(x, t), want)


def test_sample_cli_takes_every_method(tmp_path):
    model = _trained_adadiff()
    torch.save(model.state_dict(), tmp_path / "ada.pt")
    common = ["--config", "tiny", "--solver", "ddim", "--steps", "2", "--n-samples", "2", "--no-progress"]
    out = tmp_path / "ada"
    assert main(["sample", *common, "--method", "adadiff", "--theta", "0.4",
                 "--adadiff-checkpoint", str(tmp_path / "ada.pt"), "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["settings"]["theta"] == 0.4 and man["settings"]["method"] == "adadiff"
    assert len(man["checkpoints"]["adadiff"]["sha256"]) == 64
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    for extra in (["--method", "ase", "--ase-schedule", "D4"], ["--method", "multistage"]):
        assert main(["sample", *common, "--random-weights", *extra, "--out", str(tmp_path / extra[1])]) == 0
    assert json.loads((tmp_path / "ase" / "manifest.json").read_text())["settings"]["ase_schedule"] == "D4"
    # option combinations that do not fit are refused
    assert main(["sample", *common, "--random-weights", "--method", "ase", "--out", str(tmp_path / "x")]) == 2
    assert main(["sample", *common, "--random-weights", "--theta", "0.1", "--out", str(tmp_path / "x")]) == 2
    assert main(["sample", *common, "--random-weights", "--method", "base", "--t-s", "300",
                 "--out", str(tmp_path / "x")]) == 2
