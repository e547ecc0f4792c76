"""The latency benchmark: row plan, presets, failed/unstable rows, JSON contents (tiny, CPU)."""
import json

import pytest
import torch

from duodiff_fast.bench import latency


def _tiny(tmp_path, *extra):
    return ["--configs", "tiny", "--solvers", "ddim", "--ddim-steps", "3", "--backends", "reference",
            "--t-s", "0,500", "--adadiff-thetas", "", "--methods", "", "--batch-size", "1", "--repeats", "3",
            "--warmup", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "lat.json"), *extra]


def test_json_keeps_every_repeat_warmup_and_speedup_interval(tmp_path):
    res = latency.main(_tiny(tmp_path))
    data = json.loads((tmp_path / "lat.json").read_text())
    assert data == json.loads(json.dumps(res))
    base, duo = data["rows"]
    assert (base["method"], duo["method"]) == ("base", "DuoDiff t_s=500")
    for r in (base, duo):
        assert r["status"] == "ok" and len(r["batch_seconds"]["times_s"]) == 3 and len(r["warmup_seconds"]) == 1
        assert len(r["wall_batch_seconds"]) == 3 and r["clock"] == "process"
        assert isinstance(r["unstable"], bool)
    sp = duo["speedup"]
    assert sp["low"] <= sp["point"] <= sp["high"] and sp["over"] == "base"
    assert duo["layer_bound_speedup"] > 1
    assert "bootstrap" in data["statistics"]["speedup"]


def test_a_failing_row_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    from duodiff_fast.methods import DuoDiff

    def boom(self, *a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(DuoDiff, "__call__", boom)
    res = latency.main(_tiny(tmp_path))
    duo = [r for r in res["rows"] if r["method"] == "DuoDiff t_s=500"][0]
    assert duo["status"] == "failed" and "RuntimeError: kernel exploded" in duo["error"]
    assert duo["per_sample"] is None
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: kernel exploded" in out
    from duodiff_fast.cli import main as cli_main

    assert cli_main(["bench"] + _tiny(tmp_path)) == 1  # a failed row: exit status 1, after the JSON


def _row(method, times, base_times=None, unstable_iqr=10.0):
    from duodiff_fast.bench.stats import speedup, summarize

    r = dict(config="c", solver="ddim", steps=5, backend="reference", method=method, status="ok", error=None,
             warmup_seconds=[0.5], per_sample=summarize(times, unstable_iqr),
             batch_seconds=summarize(times, unstable_iqr))
    r["unstable"] = r["per_sample"]["unstable"]
    if base_times:
        r["speedup"] = dict(speedup(base_times, times), unstable=r["unstable"] or summarize(base_times)["unstable"])
    return r


def test_unstable_speedups_are_not_printed_as_figures():
    base = [1.0, 1.01, 0.99, 1.0, 1.0]
    steady = _row("DuoDiff t_s=300", [0.5, 0.5, 0.51, 0.5, 0.49], base)
    shaky = _row("DuoDiff t_s=500", [0.5, 1.5, 0.4, 0.9, 0.3], base)
    failed = dict(steady, method="DuoDiff t_s=400", status="failed", error="RuntimeError: x", per_sample=None,
                  speedup=None)
    table = latency.format_table([_row("base", base), steady, shaky, failed])
    lines = table.splitlines()
    assert "2.00x [" in lines[3]
    shaky_line = [ln for ln in lines if "t_s=500" in ln][0]
    assert "unstable" in shaky_line and "UNSTABLE" in shaky_line and "x [" not in shaky_line
    failed_line = [ln for ln in lines if "t_s=400" in ln][0]
    assert "FAILED: RuntimeError: x" in failed_line


def test_cpu_defaults_and_gpu_suite_preset_plans_are_small():
    args = latency.resolve(latency.parse_args([]), torch.device("cpu"))
    assert args.configs == "tiny" and args.clock == "process" and args.backends == "reference"
    cpu_rows = sum(len(g["rows"]) for g in latency.plan(args, "cpu"))
    assert cpu_rows <= 20
    suite = latency.resolve(latency.parse_args(["--preset", "gpu-suite", "--backends",
                                                "reference,eager-bf16,torch.compile"]), torch.device("cuda:0"))
    groups = latency.plan(suite, "cuda")
    assert suite.budget and suite.budget <= 240 and suite.clock == "wall"
    assert suite.configs == "cifar10-s2" and suite.batch_size <= 64 and suite.solvers == "ddim"
    # sampling loops of one round over all groups: bounded so the suite fits its 9 minutes
    assert sum(len(g["rows"]) for g in groups) <= 40
    kinds = {g["kind"] for g in groups}
    assert kinds == {"main", "ase", "graph"}
    assert all(g["steps"] <= 50 for g in groups)
    # an explicit option wins over the preset
    mine = latency.resolve(latency.parse_args(["--preset", "gpu-suite", "--batch-size", "8", "--backends",
                                               "reference"]), torch.device("cuda:0"))
    assert mine.batch_size == 8 and mine.graph_batches == "1,64"


def test_usage_errors_name_the_problem():
    with pytest.raises(SystemExit, match="unknown backend 'nope'"):
        latency.resolve(latency.parse_args(["--backends", "nope"]), torch.device("cpu"))
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        latency.resolve(latency.parse_args(["--repeats", "0"]), torch.device("cpu"))
    with pytest.raises(SystemExit, match="--clock process"):
        latency.resolve(latency.parse_args(["--clock", "process"]), torch.device("cuda:0"))


def test_budget_skips_groups_with_the_reason(tmp_path):
    res = latency.main(_tiny(tmp_path, "--budget", "1e-9", "--methods", "ase", "--method-solvers", "ddim",
                             "--ase-schedules", "D1"))
    skipped = [r for r in res["rows"] if r["status"] == "skipped"]
    assert skipped and all("budget" in r["error"] for r in skipped)


def test_trained_adadiff_and_multistage_checkpoints_drive_their_rows(tmp_path):
    from duodiff_fast.methods import AdaDiffUViT, MultistageUViT, save_multistage
    from duodiff_fast.models import create_model, get_spec

    torch.manual_seed(3)
    ada = AdaDiffUViT(create_model("tiny"))
    with torch.no_grad():  # every UEM says "certain": all rows leave before layer 0
        for uem in ada.uems:
            uem.out_linear.bias.fill_(-30.0)
    torch.save(ada.state_dict(), tmp_path / "ada.pt")
    ms = MultistageUViT((0.3, 0.7), stage_widths=[16, 8, 8], **get_spec("tiny").kwargs)
    save_multistage(ms, str(tmp_path / "ms.pt"))
    res = latency.main(_tiny(tmp_path, "--adadiff-thetas", "0.5", "--adadiff-solvers", "ddim",
                             "--adadiff-checkpoint", str(tmp_path / "ada.pt"), "--methods", "multistage",
                             "--multistage-checkpoint", str(tmp_path / "ms.pt")))
    rows = {r["method"]: r for r in res["rows"]}
    shrink = rows["AdaDiff 0.5 shrink"]
    assert shrink["status"] == "ok" and shrink["uem_profile"].startswith("trained:")
    assert shrink["mean_exit_layer"] == 0  # the trained (here: forced) UEMs decide, not a programmed profile
    assert rows["multistage"]["status"] == "ok" and rows["multistage"]["stage_widths"] == [16, 8, 8]
    with pytest.raises(SystemExit, match="no such file"):
        latency.resolve(latency.parse_args(["--adadiff-checkpoint", str(tmp_path / "missing.pt"),
                                            "--configs", "tiny"]), torch.device("cpu"))
    with pytest.raises(SystemExit, match="one --configs entry"):
        latency.resolve(latency.parse_args(["--adadiff-checkpoint", str(tmp_path / "ada.pt"),
                                            "--configs", "tiny,tiny-cond"]), torch.device("cpu"))


def test_configs_take_json_files_and_checkpoint_folders(tmp_path):
    """--configs accepts a JSON model config; a checkpoint folder given as --checkpoint names the
    architecture when --configs is left out."""
    from duodiff_fast.models import create_model, spec_json
    from duodiff_fast.models.pretrained import save_pretrained

    gray = json.loads(spec_json("tiny"))
    gray.update(name="gray")
    gray["model"].update(in_chans=1, depth=2)
    (tmp_path / "gray.json").write_text(json.dumps(gray))
    args = _tiny(tmp_path, "--t-s", "0")
    args[args.index("tiny")] = str(tmp_path / "gray.json")
    res = latency.main(args)
    assert [r["status"] for r in res["rows"]] == ["ok"]
    save_pretrained(create_model(str(tmp_path / "gray.json")), tmp_path / "ckpt")
    resolved = latency.resolve(latency.parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]),
                               torch.device("cpu"))
    assert resolved.configs == str(tmp_path / "ckpt")


def test_auto_backend_is_resolved_and_recorded(tmp_path):
    """--backends auto: resolved once per config (reference on a CPU), recorded per row and at the top."""
    args = _tiny(tmp_path)
    args[args.index("--backends") + 1] = "auto"
    res = latency.main(args)
    choice = res["backend_choice"]["tiny"]
    assert choice["backend"] == "reference" and choice["backend_choice"].startswith("auto: reference")
    assert {r["backend"] for r in res["rows"]} == {"reference"}
    assert {r["backend_choice"] for r in res["rows"]} == {choice["backend_choice"]}


def test_plan_replaces_auto_by_its_choice_without_duplicates():
    args = latency.resolve(latency.parse_args(["--preset", "gpu-suite", "--backends", "reference,eager-bf16,auto",
                                               "--method-backends", "auto", "--adadiff-backends", "auto"]),
                           torch.device("cuda:0"))
    args.auto_choices = {"cifar10-s2": ("eager-bf16", "auto: eager-bf16 passed self-check on X")}
    groups = latency.plan(args, "cuda")
    main = [g for g in groups if g["kind"] == "main"]
    assert [g["backend"] for g in main] == ["reference", "eager-bf16"]
    assert [g["backend_choice"] for g in main] == ["requested: reference", "requested: eager-bf16"]
    ase = [g for g in groups if g["kind"] == "ase"]
    assert [g["backend"] for g in ase] == ["eager-bf16"]
    assert ase[0]["backend_choice"] == "auto: eager-bf16 passed self-check on X"
    assert any(r.startswith("AdaDiff") for r in main[1]["rows"]) and not any(r.startswith("AdaDiff")
                                                                             for r in main[0]["rows"])
    # auto never hands torch.compile to the AdaDiff rows
    args.auto_choices = {"cifar10-s2": ("torch.compile", "auto: torch.compile passed")}
    groups = latency.plan(args, "cuda")
    assert not any(r.startswith("AdaDiff") for g in groups for r in g["rows"])
