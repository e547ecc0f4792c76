"""Crash-safe file writes shared across the package.

A write goes to a temporary file in the destination's directory (same filesystem, so the final
rename is atomic), is flushed and fsync'ed, then ``os.replace``-d over the destination. A crash or
an exception at any point before the rename leaves the previous file untouched and removes the
temporary file; a crash after it leaves the complete new file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory`` (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` atomically when the ``with`` block succeeds.

    Args:
        path: destination file; its parent directory is created if missing.
        mode: "wb" (bytes) or "w" (text).
        encoding: text encoding for mode "w" (default utf-8).

    Example::

        with atomic_write("out/model.pt") as f:
            torch.save(state, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; give the result the usual permissions of a new file.
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (utf-8)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Atomically replace ``path`` with ``obj`` serialised as JSON."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a truncated or half-written ``path`` behind."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``.

    The line is written with a single ``write`` on an ``O_APPEND`` descriptor, so concurrent
    appenders never interleave inside a line and a crash loses at most the last line.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(dict(record), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: PathLike) -> list:
    """All records of a JSONL file (a truncated last line, from a crash, is skipped)."""
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
