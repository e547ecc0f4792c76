"""benchmarks/kernels.py: the harness runs every peer once (--smoke) and exits cleanly without CUDA."""
import importlib.util
import pathlib

import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_runs_every_peer(device, capsys):
    assert _load().main(["--smoke"]) == 0
    assert "smoke: ran" in capsys.readouterr().out


def test_without_cuda_it_measures_nothing(capsys, tmp_path, monkeypatch):
    # Pretend there is no CUDA device (whatever this machine has), so the check runs everywhere.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load().main(["--results-dir", str(tmp_path)]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
