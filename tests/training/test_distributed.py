"""DistributedDataParallel on CPU: 2 processes under torchrun with the gloo backend."""
import os
import shutil
import subprocess
import sys

import torch

from duodiff_fast.io_utils import read_jsonl
from duodiff_fast.training import load_checkpoint


def _torchrun(script, spec, env, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", script, spec]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def test_ddp_two_processes_gloo(make_cfg, tiny_uvit, tmp_path, train_script, child_env, free_port):
    cfg = make_cfg(model=tiny_uvit(num_classes=4), steps=6, batch_size=8, save_every=3, log_every=2,
                   out_dir=str(tmp_path / "ddp"))
    dump = tmp_path / "dump"
    dump.mkdir()
    script, spec = train_script(cfg, dump=str(dump))
    _torchrun(script, spec, child_env, free_port())

    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["local_batch"] == 4  # the global batch of 8 is split over the ranks
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)

    # Only rank 0 writes: one log line per log step, checkpoints at 3 and 6.
    run = cfg.out_dir
    assert [r["step"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == [2, 4, 6]
    ckpt = load_checkpoint(os.path.join(run, "latest.pt"))
    assert ckpt["step"] == 6 and ckpt["data"]["world_size"] == 2
    assert len(ckpt["rng"]) == 2  # per-rank random streams, for an exact DDP resume
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])
    for k, v in ckpt["model_state_dict"].items():
        assert torch.equal(v, r0["model"][k])
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == \
        ["ckpt_00000003.pt", "ckpt_00000006.pt", "latest.pt"]

    # Resume the 2-rank run from its step-3 checkpoint in a fresh job: same end state.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(os.path.join(run, "ckpt_00000003.pt"), resumed / "latest.pt")
    dump2 = tmp_path / "dump2"
    dump2.mkdir()
    script, spec = train_script(cfg.replace(out_dir=str(resumed), resume="auto"), dump=str(dump2), name="spec2.json")
    _torchrun(script, spec, child_env, free_port())
    again = torch.load(dump2 / "rank0.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(again[part][k], r0[part][k]), (part, k)
