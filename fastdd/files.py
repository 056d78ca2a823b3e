"""fastdd's files: atomic writes and the checked, versioned container shared by ``RealStats``,
``DistilledSet`` and the checkpoints of ``distill``.

A checked file holds a payload (a dict of tensors and plain values), its kind (``format``), its format
version and its checksum, a SHA-256 over every tensor's bytes, dtype and shape and every other value of
the payload (``checksum``). It comes in one of two containers, told apart on load by the file's first
bytes:

- ``"safetensors"`` (what ``RealStats.save`` and ``DistilledSet.save`` write): a safetensors file, readable
  by any safetensors client (``safetensors.torch.load_file``). Its tensors are the payload's tensors, named
  by their keys (a tensor nested in a value is named by its path, ``settings/a/0``); its string metadata
  holds ``format``, ``format_version`` and ``checksum``, and ``payload``: the non-tensor values of the
  payload as JSON, a tensor standing as ``{"__tensor__": name}`` and the values JSON cannot tell apart as
  ``{"__tuple__": [...]}``, ``{"__float__": "nan"}``, ``{"__bytes__": hex}``, ``{"__dtype__": "float16"}``
  and ``{"__dict__": [[key, value], ...]}`` (a dict with keys other than strings). It starts with the
  8-byte little-endian length of its JSON header, then ``{``. The tensors are written straight from
  memory, chunk by chunk (a large or memory-mapped bank is never copied whole), and read with
  safetensors' ``safe_open``, which maps the file: ``load_checked(mmap=True)`` gives tensors whose pages
  are read on first use.
- ``"torch"`` (the checkpoints of ``distill``, and every file of fastdd before 0.8's safetensors): a torch
  zip file (it starts with ``PK``) holding ``{"format", "format_version", "payload", "checksum"}``, read
  with ``weights_only=True``.

Either way loading runs no code, and a truncated or altered file, a file of another kind or of a newer
format version raises ``CorruptFileError`` naming the file. Every write goes to a temporary file in the
same folder and is moved over the target with ``os.replace``: a crash while saving leaves the previous
file intact.
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
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .validate import shown

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


CONTAINERS = ("safetensors", "torch")


def save_checked(payload: dict, path: PathLike, kind: str, version: int, *, container: str = "torch") -> None:
    """Write ``payload`` to ``path`` with its kind, format version and checksum, atomically, in
    ``container``: ``"torch"`` (a torch zip file) or ``"safetensors"`` (see the module's docstring)."""
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {CONTAINERS}, got {shown(container)}")
    if container == "safetensors":
        _save_safetensors(payload, path, kind, int(version))
        return
    record = {"format": kind, "format_version": int(version), "payload": payload,
              "checksum": checksum(payload)}
    with atomic_write(path) as f:
        torch.save(record, f)


# ---- the safetensors container -----------------------------------------------------------------------
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TAGS = ("__tensor__", "__tuple__", "__float__", "__bytes__", "__dtype__", "__dict__")
_ST_CHUNK_BYTES = 1 << 24


def _is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors file's: an 8-byte little-endian header length,
    then the header's ``{`` (a torch zip file starts with ``PK``)."""
    return len(head) >= 9 and head[:2] != b"PK" and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def _file_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(9)


def _encode(obj: Any, name: str, tensors: dict) -> tuple:
    """``(json value, canonical value)`` of ``obj``: the JSON stands for it in the metadata, the canonical
    value is what loading gives back (plain types; the same tensors), so the checksum is taken of it.
    Tensors are added to ``tensors`` under ``name`` (a path)."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store a tensor of dtype {obj.dtype} in a safetensors fastdd file")
        key, n = name, 1
        while key in tensors or key == "__metadata__":
            key, n = f"{name}~{n}", n + 1
        tensors[key] = obj.detach()
        return {"__tensor__": key}, tensors[key]
    if obj is None or isinstance(obj, bool):
        return obj, obj
    if isinstance(obj, int):
        return int(obj), int(obj)
    if isinstance(obj, float):
        v = float(obj)
        if v != v or v in (float("inf"), float("-inf")):
            return {"__float__": repr(v)}, v
        return v, v
    if isinstance(obj, str):
        return str(obj), str(obj)
    if isinstance(obj, bytes):
        return {"__bytes__": bytes(obj).hex()}, bytes(obj)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}, obj
    if isinstance(obj, (list, tuple)):
        pairs = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
        js, canon = [p[0] for p in pairs], [p[1] for p in pairs]
        return (js, canon) if isinstance(obj, list) else ({"__tuple__": js}, tuple(canon))
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS):
            pairs = {k: _encode(v, f"{name}/{k}" if name else k, tensors) for k, v in obj.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        items = []
        canon = {}
        for i, (k, v) in enumerate(obj.items()):
            kj, kc = _encode(k, f"{name}/key{i}", tensors)
            vj, vc = _encode(v, f"{name}/{i}", tensors)
            items.append([kj, vj])
            canon[kc] = vc
        return {"__dict__": items}, canon
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in a fastdd file")


def _decode(js: Any, tensors: dict) -> Any:
    """The value ``_encode`` wrote as ``js``; tensors come from ``tensors``. Raises ValueError on JSON no
    fastdd writer produces (nothing is looked up but tensors and torch's dtypes: no code runs)."""
    if isinstance(js, list):
        return [_decode(v, tensors) for v in js]
    if not isinstance(js, dict):
        return js
    if len(js) == 1 and next(iter(js)) in _TAGS:
        tag, value = next(iter(js.items()))
        if tag == "__tensor__":
            if value not in tensors:
                raise ValueError(f"its payload names a tensor {value!r} the file does not hold")
            return tensors[value]
        if tag == "__tuple__" and isinstance(value, list):
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__float__" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == "__bytes__" and isinstance(value, str):
            return bytes.fromhex(value)
        if tag == "__dtype__" and isinstance(getattr(torch, str(value), None), torch.dtype):
            return getattr(torch, value)
        if tag == "__dict__" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        raise ValueError(f"its payload holds a malformed {tag} value")
    return {k: _decode(v, tensors) for k, v in js.items()}


def _save_safetensors(payload: dict, path: PathLike, kind: str, version: int) -> None:
    """``payload`` as a safetensors file (see the module's docstring), written atomically; each tensor is
    written from its own memory, ``_ST_CHUNK_BYTES`` at a time (a non-contiguous one is made contiguous)."""
    if not isinstance(payload, dict):
        raise TypeError(f"a fastdd file's payload must be a dict, got {type(payload).__name__}")
    tensors: dict = {}
    tree, canonical = _encode(payload, "", tensors)
    metadata = {"format": str(kind), "format_version": str(int(version)), "checksum": checksum(canonical),
                "payload": json.dumps(tree, separators=(",", ":"), allow_nan=False)}
    # larger elements first: with the 8-byte aligned header every tensor starts aligned to its element size
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for k in names:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    if sys.byteorder != "little":
        raise OSError(errno.ENOTSUP, "safetensors files are little-endian; this machine is not", str(path))
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in names:
            t = tensors[k]
            if t.numel() == 0:
                continue
            flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
            step = max(1, _ST_CHUNK_BYTES // t.element_size())
            for start in range(0, flat.numel(), step):
                chunk = flat[start:start + step]
                if chunk.device.type != "cpu":
                    chunk = chunk.cpu()
                f.write(memoryview(chunk.view(torch.uint8).numpy()))


def _read_safetensors(path: Path, mmap: bool) -> tuple:
    """``(metadata, tensors)`` of a safetensors file; the tensors map the file when ``mmap``, else they
    are read into memory. Raises whatever safetensors raises for a malformed or truncated file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not mmap:
        tensors = {k: t.clone() for k, t in tensors.items()}
    return metadata, tensors


def _safetensors_record(path: Path, kind: Optional[str], mmap: bool) -> dict:
    """A fastdd safetensors file as a torch-format record ``{"format", "format_version", "checksum",
    "payload"}`` (a foreign safetensors file: its tensors, without ``format``). The payload is decoded
    for a file of ``kind`` only (of any kind for None)."""
    try:
        metadata, tensors = _read_safetensors(path, mmap)
    except PermissionError:
        raise
    except Exception as e:
        raise CorruptFileError(f"{path} is corrupt or not a fastdd file (cannot be read as safetensors: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no reason given'})"
                               ) from None
    if "format" not in metadata or "payload" not in metadata:
        return tensors
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        version = metadata.get("format_version")
    record = {"format": metadata["format"], "format_version": version, "checksum": metadata.get("checksum")}
    if kind is not None and metadata["format"] != kind:
        return {**record, "payload": None}
    try:
        record["payload"] = _decode(json.loads(metadata["payload"]), tensors)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise CorruptFileError(f"{path} is corrupt: its payload metadata cannot be read ({e})") from None
    return record


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
    ValueError that says in one line why torch refused it, never advising ``weights_only=False``.

    A safetensors file (told by its first bytes) gives its tensors by name, or for a fastdd file the
    record a torch-format fastdd file holds (``{"format", "format_version", "checksum", "payload"}``,
    unchecked: ``load_checked`` checks it)."""
    try:
        if _is_safetensors(_file_head(Path(path))):
            return _safetensors_record(Path(path), None, mmap=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except CorruptFileError as e:
        raise ValueError(f"{path} cannot be read as a tensor file ({e})") from None
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a tensor file ({_torch_reason(e)})") from None


def load_checked(path: PathLike, kind: str, version: int, *, mmap: bool = False, verify: bool = True) -> dict:
    """Read a file written by ``save_checked`` (either container, told by its first bytes) and return its
    payload; its tensors map the file when ``mmap``.

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
        safetensors_file = _is_safetensors(_file_head(path))
    except PermissionError:
        raise
    except OSError as e:
        raise CorruptFileError(f"{path} cannot be read ({e.strerror or e})") from None
    if safetensors_file:
        return _check_record(_safetensors_record(path, kind, mmap), path, kind, version, verify)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:  # unreadable: not a corrupt file (torch's OSError(EINVAL) of a truncated zip is)
        raise
    except Exception as e:  # truncated zip, garbage bytes, pickle errors: all mean "unreadable"
        raise CorruptFileError(f"{path} is corrupt or not a fastdd file (cannot be read: "
                               f"{_torch_reason(e)})") from None
    return _check_record(record, path, kind, version, verify)


def _check_record(record: Any, path: Path, kind: str, version: int, verify: bool) -> dict:
    """The payload of a fastdd file's record, after checking its kind, format version and checksum."""
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
