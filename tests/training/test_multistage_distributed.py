"""Multistage training under DistributedDataParallel (2 CPU processes, gloo): every rank trains the
same stage in a step, and an exact resume replays the stage sequence."""
import json
import os
import shutil
import subprocess
import sys

import torch

from duodiff_fast.methods.multistage_training import MultistageObjective
from duodiff_fast.schedules import linear_ddpm

_CHILD = '''\
import json, os, sys
import torch
from duodiff_fast.methods.multistage import MultistageUViT
from duodiff_fast.methods.multistage_training import MultistageObjective
from duodiff_fast.schedules import linear_ddpm
from duodiff_fast.training import TrainConfig, Trainer

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(1)
cfg = TrainConfig.from_dict(spec["cfg"])
torch.manual_seed(0)
model = MultistageUViT((0.3, 0.6), **spec["uvit"])
stages = []


class Recording(MultistageObjective):
    def __call__(self, model, x0, y, generator=None):
        step = self.step
        loss, metrics = super().__call__(model, x0, y, generator)
        stages.append((step, int(metrics["stage"])))
        return loss, metrics


trainer = Trainer(cfg, model=model, loss_fn=Recording(linear_ddpm(), (0.3, 0.6)))
try:
    trainer.fit()
finally:
    trainer.close()
rank = int(os.environ.get("RANK", "0"))
json.dump(stages, open(os.path.join(spec["dump"], "stages%d.json" % rank), "w"))
'''


def _run(tmp_path, cfg, uvit, dump, env, port, name):
    script = tmp_path / "multistage_child.py"
    script.write_text(_CHILD)
    spec = tmp_path / name
    spec.write_text(json.dumps({"cfg": cfg.to_dict(), "uvit": uvit, "dump": str(dump)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return [json.load(open(dump / f"stages{r}.json")) for r in (0, 1)]


def test_ranks_train_one_stage_per_step_and_resume_replays_it(make_cfg, tiny_uvit, tmp_path, child_env, free_port):
    uvit = tiny_uvit()
    cfg = make_cfg(model=uvit, steps=8, batch_size=8, save_every=4, log_every=4, find_unused_parameters=True,
                   out_dir=str(tmp_path / "run"))
    dump = tmp_path / "dump"
    dump.mkdir()
    r0, r1 = _run(tmp_path, cfg, uvit, dump, child_env, free_port(), "spec.json")
    assert [s for s, _ in r0] == list(range(8))
    assert r0 == r1  # the same stage on both ranks at every step
    assert len({stage for _, stage in r0}) > 1  # and the stage does change between steps

    # Resume from the step-4 checkpoint in a fresh job: steps 4..7 train the same stages again.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(os.path.join(cfg.out_dir, "ckpt_00000004.pt"), resumed / "latest.pt")
    dump2 = tmp_path / "dump2"
    dump2.mkdir()
    a0, a1 = _run(tmp_path, cfg.replace(out_dir=str(resumed), resume="auto"), uvit, dump2, child_env,
                  free_port(), "spec2.json")
    assert a0 == a1 == r0[4:]


def test_stage_depends_on_seed_and_step_only():
    obj = MultistageObjective(linear_ddpm(), (0.3, 0.6), seed=5)
    seq = [obj.stage_for_step(s) for s in range(40)]
    assert set(seq) == {0, 1, 2}
    # Different per-rank generators, same step: same stage; the step counter advances per call.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    obj.on_step(7)
    i1, t1 = obj.sample_stage_t(4, "cpu", g1)
    i2, t2 = obj.sample_stage_t(4, "cpu", g2)
    assert i1 == i2 == seq[7] and not torch.equal(t1, t2)
    other = MultistageObjective(linear_ddpm(), (0.3, 0.6), seed=6)
    assert [other.stage_for_step(s) for s in range(40)] != seq
