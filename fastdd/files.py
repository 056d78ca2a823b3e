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
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

__all__ = ["load_tensors", "CorruptFileError", "DiskFullError", "atomic_write", "write_json", "checksum", "save_checked", "load_checked"]

_HASH_CHUNK_BYTES = 1 << 24
PathLike = Union[str, os.PathLike]


class CorruptFileError(ValueError):
    """A fastdd file is truncated, altered, of another kind or of a newer format version."""


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, synced and moved
    over ``path`` in one step, on any error it is removed. Missing parent folders are created.

    The file gets the mode a plain ``open(path, "w")`` would give it: an existing file's mode, else
    0666 less the umask. The temporary file is ``.<name>.<host>-<pid>.<token>.tmp``; each write first
    removes the stale ones a killed writer of the same path left (``_remove_stale``). A failed write
    raises an ``OSError`` naming ``path`` (not the temporary file); a full disk is a ``DiskFullError``,
    also when torch's writer reports it (its ``inline_container.cc ... unexpected pos`` RuntimeError)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = folder / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder, path.name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise _named(e, path) from e
    try:
        with os.fdopen(fd, mode) as f:
            with contextlib.suppress(FileNotFoundError):  # a plain open() keeps an existing file's mode
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            yield f
            _finish(f, tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = None if isinstance(e, DiskFullError) else _disk_full(e, tmp)
        if full is not None:
            raise DiskFullError(full.errno, full.strerror, str(path)) from e
        raise


def _disk_full(e: Optional[BaseException], tmp: Path) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError of writing ``tmp`` in ``e``'s chain: ``e`` itself, or what torch's
    writer (a RuntimeError) or a closing file (a second OSError) raised on top of it."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in _DISK_FULL and e.filename in (None, str(tmp)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _finish(f, tmp: Path, path: Path) -> None:
    """Flush and sync ``f`` and move ``tmp`` over ``path``; a failure names ``path``."""
    try:
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full: names the file, errno ENOSPC/EDQUOT."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: the disk is full ({os.strerror(self.errno).lower()})"


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _named(e: OSError, path: Path) -> OSError:
    """``e`` re-raised as the same OSError type naming ``path``; a ``DiskFullError`` for a full disk."""
    kind = DiskFullError if e.errno in _DISK_FULL else type(e)
    return kind(e.errno, e.strerror or os.strerror(e.errno or 0), str(path))


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
STALE_AGE_S = 24 * 3600  # a temporary file untouched this long has no live writer, wherever it runs


def _remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary files of ``name`` that no live writer holds: those of a dead process of
    this host (the pid in the name), and any untouched for ``STALE_AGE_S`` (another host's, or an older
    fastdd's ``.<name>.<random>.tmp``). A live writer's file is kept: its pid is alive, or it is young."""
    prefix = f".{name}."
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = re.fullmatch(r"([A-Za-z0-9-]+)-([0-9]+)\.[0-9a-f]+", entry.name[len(prefix):-len(".tmp")])
        try:
            dead = match is not None and match[1] == _HOST and not _alive(int(match[2]))
            if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_AGE_S:
                os.unlink(entry.path)
        except OSError:  # removed meanwhile by another writer, or not ours to remove: leave it
            pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (our own pid counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        return True
    return True


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


def _torch_reason(e: Exception) -> str:
    """Why ``torch.load`` refused a file, in one line, without torch's advice to load it with
    ``weights_only=False`` (that runs the file's code: fastdd files hold tensors and plain values only)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\.\s|\.?$)", text, re.S)
        detail = found[1].strip() if found else "an object of a type fastdd does not load"
        return f"it holds Python objects, not only tensors and plain values: {detail}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(e).__name__}: {lines[0] if lines else 'no reason given'}"


def load_tensors(path: PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (no code runs) for files of other tools; a
    ValueError that says in one line why torch refused it, never advising ``weights_only=False``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a tensor file ({_torch_reason(e)})") from None


def load_checked(path: PathLike, kind: str, version: int, *, mmap: bool = False, verify: bool = True) -> dict:
    """Read a file written by ``save_checked`` and return its payload.

    Raises:
        FileNotFoundError: ``path`` does not exist. IsADirectoryError: ``path`` is a folder.
        CorruptFileError: the file cannot be read, is of another kind, has a newer format version, or its
            checksum does not match its content.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"is a folder, not a {kind} file", str(path))
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:  # unreadable: not a corrupt file (torch's OSError(EINVAL) of a truncated zip is)
        raise
    except Exception as e:  # truncated zip, garbage bytes, pickle errors: all mean "unreadable"
        raise CorruptFileError(f"{path} is corrupt or not a fastdd file (cannot be read: "
                               f"{_torch_reason(e)})") from None
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
