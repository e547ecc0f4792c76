"""Shared fixtures for the training tests: a tiny U-ViT config and quick TrainConfigs."""
from __future__ import annotations

import os
import socket

import pytest
import torch

import duodiff_fast

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(duodiff_fast.__file__)))

# img 8x8, patch 2 -> 16 tokens; width 32, depth 2 (1 in, mid, 1 out): trains in milliseconds.
TINY_UVIT = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                 qkv_bias=False, qk_scale=None, mlp_time_embed=False, num_classes=-1, conv=True, skip=True)


def tiny_uvit(**overrides):
    return dict(TINY_UVIT, **overrides)


@pytest.fixture(autouse=True)
def _every_training_test_one_thread(one_thread):
    """Every training test runs tiny models: one intra-op thread (tests/conftest.py's one_thread)."""
    yield


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(**changes) -> TrainConfig`` for a fast CPU run in ``tmp_path/run``."""
    from duodiff_fast.training import TrainConfig

    def make(**changes):
        base = dict(
            model=tiny_uvit(), schedule="linear", data={"source": "synthetic", "num_samples": 48, "seed": 1},
            batch_size=8, steps=20, lr=1e-3, warmup_steps=5, ema_decay=0.9, out_dir=str(tmp_path / "run"),
            save_every=0, keep_last=2, log_every=1, device="cpu", progress=False, resume=None,
        )
        base.update(changes)
        return TrainConfig(**base)

    return make


@pytest.fixture(name="tiny_uvit")
def tiny_uvit_fixture():
    """``tiny_uvit(**overrides) -> dict`` of UViT keywords."""
    return tiny_uvit


@pytest.fixture(name="child_env")
def child_env_fixture():
    return subprocess_env()


@pytest.fixture(name="free_port")
def free_port_fixture():
    """``free_port() -> int``: a TCP port nobody listens on right now."""
    return free_port


def subprocess_env() -> dict:
    """Environment for child Python processes: the repo on PYTHONPATH, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




_TRAIN_SCRIPT = '''\
"""Child process of the training tests: train(cfg) from a JSON spec, dump the final weights."""
import json, os, sys
import torch
from duodiff_fast.training import TrainConfig, train

spec = json.load(open(sys.argv[1]))
if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
trainer = train(TrainConfig.from_dict(spec["cfg"]))
if spec.get("dump"):
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "step": trainer.step,
                "world_size": trainer.env.world_size, "local_batch": trainer.sampler.local_batch},
               os.path.join(spec["dump"], "rank%d.pt" % rank))
'''


@pytest.fixture
def train_script(tmp_path):
    """Write the child script; returns ``write_spec(cfg, dump=None) -> (script, spec_path)``."""
    import json

    script = tmp_path / "train_child.py"
    script.write_text(_TRAIN_SCRIPT)

    def write_spec(cfg, dump=None, name="spec.json"):
        spec_path = tmp_path / name
        spec_path.write_text(json.dumps({"cfg": cfg.to_dict(), "dump": dump, "threads": torch.get_num_threads()}))
        return str(script), str(spec_path)

    return write_spec
