"""Provenance recorded with sample sets and tables: checkpoint hashes, versions, device, settings hash."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Dict, Mapping

import torch

__all__ = ["checkpoint_hashes", "environment", "settings_fingerprint"]


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from .fid import file_sha256

    return file_sha256(path)


def checkpoint_hashes(checkpoints: Mapping[str, str]) -> Dict[str, Dict[str, str]]:
    """{role: {"path", "sha256"}} for every checkpoint file a method read.

    A file is hashed once per process while its size and modification time stay the same (an
    eval grid reads the full checkpoint for several methods).
    """
    out = {}
    for role, path in sorted(checkpoints.items()):
        if os.path.isdir(path):
            out[role] = _folder_hash(path)
            continue
        st = os.stat(path)
        out[role] = {"path": path, "sha256": _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)}
    return out


def _file_hash(path: str) -> str:
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _folder_hash(path: str) -> Dict[str, str]:
    """A checkpoint folder, run folder or training-state folder: the hash of the weights file it
    resolves to, combined with that folder's ``config.json`` when it has one (the head count
    lives there, not in the weights)."""
    from ..models.checkpoint import resolve_checkpoint_path

    file, _ = resolve_checkpoint_path(path)
    config = os.path.join(os.path.dirname(file), "config.json")
    digest = _file_hash(file)
    if os.path.isfile(config):
        digest = hashlib.sha256(f"{digest}:{_file_hash(config)}".encode()).hexdigest()
    return {"path": path, "file": file, "sha256": digest}


def environment(device: torch.device) -> Dict[str, object]:
    """Device name and versions (the benchmark's record, plus this package's version)."""
    from ..bench.common import environment as bench_environment
    from ..version import __version__

    return dict(bench_environment(torch.device(device)), duodiff_fast=__version__)


def settings_fingerprint(settings: Mapping[str, object]) -> str:
    """SHA-256 of the settings as canonical JSON: equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
