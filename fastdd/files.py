"""fastdd's files: atomic writes and the checked, versioned container shared by ``RealStats``,
``DistilledSet`` and the checkpoints of ``distill``.

A checked file is a torch zip file holding ``{"format", "format_version", "payload", "checksum"}``, where
the checksum is a SHA-256 over every tensor's bytes, dtype and shape and every other value of the
payload. A truncated or altered file raises ``CorruptFileError`` naming the file; it is read with
``weights_only=True``, so loading runs no code. Every write goes to a temporary file in the same folder
and is moved over the target with ``os.replace``: a crash while saving leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

__all__ = ["CorruptFileError", "atomic_write", "write_json", "checksum", "save_checked", "load_checked"]

_HASH_CHUNK_BYTES = 1 << 24
PathLike = Union[str, os.PathLike]


class CorruptFileError(ValueError):
    """A fastdd file is truncated, altered, of another kind or of a newer format version."""


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, synced and moved
    over ``path`` in one step, on any error it is removed. Missing parent folders are created."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: PathLike, doc: Any, indent: int = 1) -> None:
    """``doc`` as JSON at ``path``, atomically (values JSON cannot hold are written as strings)."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, indent=indent, default=str))


def _digest(obj: Any, h) -> None:
    """Feed a canonical encoding of ``obj`` (nested dict/list/tuple of tensors and plain values) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel() == 0:
            return
        t = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        if t.device.type != "cpu":
            t = t.cpu()
        # hash in chunks so memory-mapped banks are read page by page, never copied whole
        step = max(1, _HASH_CHUNK_BYTES // t.element_size())
        for start in range(0, t.numel(), step):
            h.update(t[start:start + step].contiguous().view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"V{type(obj).__name__}{obj!r}".encode())
    elif isinstance(obj, torch.dtype):
        h.update(f"Y{obj}".encode())
    else:
        raise TypeError(f"cannot store a value of type {type(obj).__name__} in a fastdd file")


def checksum(payload: Any) -> str:
    """SHA-256 (hex) of the canonical encoding of ``payload``."""
    h = hashlib.sha256()
    _digest(payload, h)
    return h.hexdigest()


def save_checked(payload: dict, path: PathLike, kind: str, version: int) -> None:
    """Write ``payload`` to ``path`` with its kind, format version and checksum, atomically."""
    record = {"format": kind, "format_version": int(version), "payload": payload,
              "checksum": checksum(payload)}
    with atomic_write(path) as f:
        torch.save(record, f)


def load_checked(path: PathLike, kind: str, version: int, *, mmap: bool = False, verify: bool = True) -> dict:
    """Read a file written by ``save_checked`` and return its payload.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: the file cannot be read, is of another kind, has a newer format version, or its
            checksum does not match its content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors: all mean "unreadable"
        raise CorruptFileError(f"{path} is corrupt or not a fastdd file (cannot be read: "
                               f"{type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or "format" not in record or "payload" not in record:
        raise CorruptFileError(f"{path} is not a fastdd file (no format header)")
    if record["format"] != kind:
        raise CorruptFileError(f"{path} holds a {record['format']!r}, expected a {kind!r}")
    found = record.get("format_version")
    if not isinstance(found, int) or found > version or found < 1:
        raise CorruptFileError(f"{path} has format version {found!r}; this fastdd reads versions 1..{version} "
                               "(upgrade fastdd to read newer files)")
    if verify and checksum(record["payload"]) != record.get("checksum"):
        raise CorruptFileError(f"{path} is corrupt: its checksum does not match its content")
    return record["payload"]
