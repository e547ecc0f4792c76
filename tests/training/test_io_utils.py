"""duodiff_fast.io_utils: atomic writes never leave a half-written file behind."""
import os

import pytest
import torch

from duodiff_fast import io_utils


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    io_utils.atomic_write_text(path, "one")
    io_utils.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert _leftovers(path.parent) == []
    io_utils.atomic_write_json(tmp_path / "c.json", {"a": [1, 2]})
    assert '"a"' in (tmp_path / "c.json").read_text()


def test_exception_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    io_utils.atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with io_utils.atomic_write(path) as f:
            f.write(b"partial new content")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_torch_save_crash_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    io_utils.atomic_torch_save({"w": torch.arange(4)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"garbage that is not a checkpoint")  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        io_utils.atomic_torch_save({"w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    assert _leftovers(tmp_path) == []


def test_append_jsonl_roundtrip_and_truncated_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    io_utils.append_jsonl(path, {"step": 1, "loss": 0.5})
    io_utils.append_jsonl(path, {"step": 2, "loss": 0.25})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    assert [r["step"] for r in io_utils.read_jsonl(path)] == [1, 2]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        with io_utils.atomic_write("x", mode="a"):
            pass
