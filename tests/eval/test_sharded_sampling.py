"""Sharded sampling: disjoint shards per rank, identical sets for 1 and N processes, kill-and-resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.eval.sample_cmd import sample_labels
from duodiff_fast.eval.sharding import ShardPlan, merge_shards, read_shard_header, shard_path

# tiny-cond: class labels travel with the samples too; DDIM with eta=1 draws step noise per sample.
ARGS = ["sample", "--config", "tiny-cond", "--random-weights", "--solver", "ddim", "--eta", "1", "--steps", "3",
        "--seed", "11", "--n-samples", "12", "--shard-size", "2", "--batch-size", "2", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _cmd(out, nproc=None, extra=()):
    if nproc is None:
        return [sys.executable, "-m", "duodiff_fast", *ARGS, "--out", str(out), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "duodiff_fast", *ARGS, "--out", str(out), *extra]


def _run(cmd):
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _load(out):
    with np.load(out / "samples.npz") as d:
        return d["arr_0"], d["arr_1"]


def test_shard_plan_is_disjoint_and_covers():
    plan = ShardPlan(23, 4)
    assert plan.num_shards == 6 and plan.shard_range(5) == (20, 23)
    for world in (1, 2, 3, 7):
        owned = [plan.shards_of_rank(r, world) for r in range(world)]
        flat = sorted(k for ks in owned for k in ks)
        assert flat == list(range(6))
        idx = sorted(i for ks in owned for k in ks for i in range(*plan.shard_range(k)))
        assert idx == list(range(23))
    with pytest.raises(ValueError):
        ShardPlan(0, 4)
    with pytest.raises(ValueError):
        plan.shards_of_rank(3, 3)


def test_dist_info_and_progress_count(tmp_path, monkeypatch):
    from duodiff_fast.eval.sharding import _count_done, _write_progress, dist_info

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert (dist_info().rank, dist_info().world_size, dist_info().local_rank) == (2, 3, 0)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3"):
        dist_info()
    plan = ShardPlan(10, 4)  # shards of 4, 4, 2
    out = str(tmp_path)
    os.makedirs(os.path.dirname(shard_path(out, 0)))
    open(shard_path(out, 2), "wb").close()  # finished: 2 samples
    _write_progress(out, 0, 0, 3)  # rank 0: 3 samples into shard 0
    _write_progress(out, 1, 2, 1)  # a stale record of the finished shard is not counted twice
    assert _count_done(out, plan) == 5


def test_labels_depend_only_on_seed_and_index():
    a = sample_labels(np.arange(10), 5, None, 11)
    b = sample_labels(np.arange(4, 8), 5, None, 11)
    np.testing.assert_array_equal(a[4:8], b)
    assert a.min() >= 0 and a.max() <= 9  # never the null class 10
    assert len(set(a.tolist())) > 1
    assert not np.array_equal(a, sample_labels(np.arange(10), 6, None, 11))
    np.testing.assert_array_equal(sample_labels(np.arange(5), 0, "3,7", 11), [3, 7, 3, 7, 3])
    assert sample_labels(np.arange(3), 0, None, 0) is None


def test_in_process_shard_size_does_not_change_samples(tmp_path):
    assert main(ARGS + ["--out", str(tmp_path / "a")]) == 0
    assert main([*ARGS[:-5], "--shard-size", "5", "--batch-size", "3", "--no-progress", "--out",
                 str(tmp_path / "b")]) == 0
    xa, ya = _load(tmp_path / "a")
    xb, yb = _load(tmp_path / "b")
    assert xa.shape == (12, 16, 16, 3) and xa.dtype == np.uint8
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(xa, xb)
    fa = torch.load(tmp_path / "a" / "samples.pt", weights_only=True)
    assert fa.shape == (12, 3, 16, 16)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["count"] == 12 and man["num_shards"] == 6 and man["settings"]["seed"] == 11
    assert man["settings"]["method"] == "base" and man["settings"]["solver"] == "ddim"
    assert man["environment"]["torch"] == torch.__version__ and man["wall_time_s"] > 0
    # a rerun in the same folder with other settings is refused, not mixed in
    assert main([*ARGS[:ARGS.index("--seed")], "--seed", "12", *ARGS[ARGS.index("--seed") + 2:],
                 "--out", str(tmp_path / "a")]) == 2


def test_merge_checks_coverage(tmp_path):
    assert main(ARGS + ["--out", str(tmp_path / "m")]) == 0
    fp, idx = read_shard_header(shard_path(str(tmp_path / "m"), 1))
    np.testing.assert_array_equal(idx, [2, 3])
    os.remove(shard_path(str(tmp_path / "m"), 3))
    with pytest.raises(FileNotFoundError, match="shard 3"):
        merge_shards(str(tmp_path / "m"), ShardPlan(12, 2), fp)
    with pytest.raises(ValueError, match="another run"):
        merge_shards(str(tmp_path / "m"), ShardPlan(12, 2), "0" * 64)


def test_one_and_many_processes_and_kill_resume_give_the_same_set(tmp_path):
    one, many, killed = tmp_path / "one", tmp_path / "many", tmp_path / "killed"
    _run(_cmd(one))
    x1, y1 = _load(one)

    # three processes under torchrun: the same images and labels, drawn by three ranks
    _run(_cmd(many, nproc=3))
    x3, y3 = _load(many)
    np.testing.assert_array_equal(x1, x3)
    np.testing.assert_array_equal(y1, y3)
    assert json.loads((many / "manifest.json").read_text())["world_size"] == 3

    # a run killed after its first shard, resumed with two processes
    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(shard_path(str(killed), 0)):
            assert proc.poll() is None, "the run ended before its first shard"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = sorted(os.listdir(killed / "shards"))
    assert "shard_000000.npz" in done_before and "shard_000005.npz" not in done_before
    assert not (killed / "samples.npz").exists()
    mtime0 = os.path.getmtime(shard_path(str(killed), 0))
    _run(_cmd(killed, nproc=2))
    xk, yk = _load(killed)
    np.testing.assert_array_equal(x1, xk)
    np.testing.assert_array_equal(y1, yk)
    assert os.path.getmtime(shard_path(str(killed), 0)) == mtime0  # the finished shard was not redrawn
    assert not [n for n in os.listdir(killed / "shards") if n.endswith(".tmp")]


def test_device_for_makes_the_local_gpu_current(monkeypatch):
    """Under torchrun each rank samples on cuda:LOCAL_RANK *and makes it current* (as training does),
    so Triton launches, streams and graphs do not default to GPU 0 (issue 20)."""
    from duodiff_fast.eval import sample_cmd

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    assert sample_cmd.device_for(None, 1) == torch.device("cuda", 1)
    assert sample_cmd.device_for("cuda", 1) == torch.device("cuda", 1)
    assert sample_cmd.device_for("cuda:0", 1) == torch.device("cuda", 0)
    assert calls == [torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cuda", 0)]
    assert sample_cmd.device_for("cpu", 1) == torch.device("cpu") and len(calls) == 3


def test_set_local_device_refuses_a_gpu_the_machine_lacks(monkeypatch):
    from duodiff_fast.errors import DeviceUnavailable
    from duodiff_fast.eval.sharding import set_local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match="cuda:1 .* 1 CUDA device"):
        set_local_device("cuda:1")
    assert set_local_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_sample_on_the_second_gpu(tmp_path):
    """`duodiff-fast sample --device cuda:1` (triton backend, graphs off) gives the images cuda:0 gives."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    base = ["sample", "--config", "tiny", "--random-weights", "--steps", "3", "--n-samples", "2",
            "--batch-size", "2", "--no-progress", "--no-float", "--backend", "triton"]
    for dev in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        assert main(base + ["--device", dev, "--out", str(tmp_path / dev.replace(":", ""))]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("cuda0", "cuda1"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
