"""The README's "Your own data and model" commands, run as written: a 1-channel 16x16
class-conditional data set, a JSON model config, training from the CLI, and sampling from the
run folder without --config."""
import json
import os
import re
import shlex

import numpy as np
import pytest

from duodiff_fast.cli import main

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section(title: str) -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index(f"### {title}")
    end = text.find("\n## ", start)
    nxt = text.find("\n### ", start + 4)
    return text[start: min(e for e in (end, nxt) if e != -1)]


def _blocks(section: str, lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(block: str):
    """``duodiff-fast`` command lines of a bash block (continuations joined), as argv lists."""
    lines = block.replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "duodiff-fast", line
            out.append(argv[1:])
    return out


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Run the README example once in a fresh folder (the current directory while the tests run)."""
    import torch

    tmp_path = tmp_path_factory.mktemp("readme")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp_path)
    torch.set_num_threads(1)  # tiny models: intra-op threads only spin on a busy machine (tests/conftest.py)
    try:
        yield _run_readme_example(tmp_path)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _run_readme_example(tmp_path):
    import contextlib
    import io
    (config,) = _blocks(_section("Model configs"), "json")
    (tmp_path / "gray16.json").write_text(config)
    example = _section("Example: a 1-channel class-conditional model")
    (make_data,) = _blocks(example, "python")
    exec(compile(make_data, "README example", "exec"), {})
    train, sample = _commands(_blocks(example, "bash")[0])
    assert train[0] == "train" and sample[0] == "sample" and "--config" not in sample
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(train + ["--no-progress", "--device", "cpu"]) == 0
    assert "exported the EMA weights" in log.getvalue()
    assert main(sample + ["--no-progress", "--device", "cpu"]) == 0
    return tmp_path


def _example_train():
    return _commands(_blocks(_section("Example: a 1-channel class-conditional model"), "bash")[0])[0]


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_readme_example_trains_and_samples_grayscale(readme_run):
    from PIL import Image

    run, out = readme_run / "runs" / "gray16", readme_run / "samples" / "gray16"
    ema = json.load(open(run / "export" / "ema" / "config.json"))
    assert ema["weights"] == "ema" and ema["model"]["in_chans"] == 1 and ema["model"]["num_heads"] == 2
    assert ema["ema"]["warmup"] is True and ema["step"] == int(_flag(_example_train(), "--steps"))
    assert json.load(open(run / "export" / "raw" / "config.json"))["weights"] == "raw"
    assert json.load(open(run / "config.json"))["train"]["hflip"] is False

    with np.load(out / "samples.npz") as d:
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    grid = Image.open(out / "grid.png")
    # 8 images of 16x16: ceil(sqrt(8)) = 3 per row, 3 rows, 2-pixel padding: 3 * 18 + 2 = 56.
    assert grid.mode == "L" and grid.size == (56, 56)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["settings"]["config"] == "gray16"
    assert manifest["settings"]["model_config"]["in_chans"] == 1
    assert manifest["checkpoints"]["full"]["file"].endswith(os.path.join("export", "ema", "model.safetensors"))


def test_cli_flips_configs_show_and_head_count_refusal(readme_run, capsys, one_thread):
    import torch

    from duodiff_fast.models import get_spec, load_model, save_weights
    from duodiff_fast.models.configs import ModelSpec

    # --hflip is recorded in the run's config.
    assert main(["train", "--config", "gray16.json", "--data", "npz:gray16.npz", "--steps", "1", "--batch-size", "4",
                 "--out-dir", "runs/flip", "--hflip", "--no-progress", "--device", "cpu"]) == 0
    assert json.load(open("runs/flip/config.json"))["train"]["hflip"] is True
    # configs --show prints JSON that parses back to the same config.
    capsys.readouterr()
    assert main(["configs", "--show", "tiny-cond"]) == 0
    assert ModelSpec.from_dict(json.loads(capsys.readouterr().out)) == get_spec("tiny-cond")
    # A plain state dict of this unregistered shape: sample refuses to guess its head count ...
    save_weights(load_model("runs/gray16"), "plain.pth")
    args = ["sample", "--checkpoint", "plain.pth", "--n-samples", "1", "--steps", "2", "--out", "s", "--no-progress"]
    assert main(args) == 2
    assert "does not record its model config" in capsys.readouterr().err
    # ... and loads it with the config given.
    assert main(args + ["--config", "gray16.json"]) == 0
    # A folder and a contradicting --config: refused, naming the head count.
    spec = json.load(open("gray16.json"))
    spec["model"]["num_heads"] = 4
    with open("four.json", "w") as f:
        json.dump(spec, f)
    assert main(["sample", "--checkpoint", "runs/gray16", "--config", "four.json", "--n-samples", "1",
                 "--steps", "2", "--out", "s4", "--no-progress"]) == 2
    assert "num_heads: checkpoint 2 vs model 4" in capsys.readouterr().err
    assert torch.equal(load_model("runs/gray16").pos_embed, load_model("runs/gray16/export/ema").pos_embed)


def test_latest_pt_with_use_ema_samples_what_the_run_folder_does(readme_run, one_thread):
    """The run folder's default (export/ema) is the EMA of latest.pt: the same images, bit for bit."""
    example = _commands(_blocks(_section("Example: a 1-channel class-conditional model"), "bash")[0])[1]
    argv = [a if a != "runs/gray16" else "runs/gray16/latest.pt" for a in example]
    argv[argv.index("--out") + 1] = "samples/from_latest"
    assert main(argv + ["--use-ema", "--no-progress", "--device", "cpu"]) == 0
    with np.load("samples/gray16/samples.npz") as a, np.load("samples/from_latest/samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
