"""Argument validation, in one module so that every function of fastdd words its errors alike.

Every checker names the argument it was given (``name``) and returns the value in its canonical form
(an int, a float, an int64 tensor, a Path). The data-dependent checks (label ranges, NaN/Inf, and the
losses' and ops' own value checks) read tensor values on the host: on an accelerator each is a device
synchronisation, under ``torch.compile`` a graph break. Inside a step (an op or a loss) they run only
while :func:`checks_enabled` says so, the one rule for all of them: never while ``torch.compile``
traces the code; with ``FASTDD_CHECKS=1`` (the debug setting) always, with ``FASTDD_CHECKS=0`` never;
unset (the default), in a call of an op or a loss but not inside ``distill``'s steps
(:func:`distill_step`), which make no host synchronisation: ``distill`` checks its inputs at its entry
and a non-finite loss when the loss history is flushed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import secrets
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from . import _backend

__all__ = ["positive_int", "positive_float", "finite_float", "probability", "value_range", "tensor_range", "class_labels",
           "features", "finite", "output_path", "input_file", "seed", "one_of", "checks_enabled",
           "distill_step", "shown"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


_IN_DISTILL_STEP = contextvars.ContextVar("fastdd_in_distill_step", default=False)


def checks_enabled() -> bool:
    """Whether the data-dependent checks of a step (label range, NaN/Inf, value checks; one host sync
    each) run (see the module docstring): not while ``torch.compile`` traces (it cannot branch on a
    tensor's value without a graph break); else as ``FASTDD_CHECKS`` says (``fastdd._backend``), and
    when it is unset, everywhere but inside ``distill``'s steps. Every such check of fastdd's ops and
    losses asks here."""
    if torch.compiler.is_compiling():
        return False
    setting = _backend.checks_setting()
    return (not _IN_DISTILL_STEP.get()) if setting is None else setting


@contextlib.contextmanager
def distill_step():
    """The block of one ``distill`` step: its data-dependent checks off unless ``FASTDD_CHECKS=1``."""
    token = _IN_DISTILL_STEP.set(True)
    try:
        yield
    finally:
        _IN_DISTILL_STEP.reset(token)


def shown(value, limit: int = 80) -> str:
    """``value`` as an error message shows it: a module or a tensor by its kind (never a whole module's
    repr, or a tensor's values), anything else by its repr cut to ``limit`` characters."""
    if isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__} module"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({type(value).__name__})"


def positive_int(name: str, value, allow_none: bool = False, minimum: int = 1):
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``); a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {shown(value)}")
    return value


def positive_float(name: str, value) -> float:
    """``value`` as a finite float > 0 (inf would make a loss constant, NaN poisons every step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {shown(value)}")
    return float(value)


def finite_float(name: str, value) -> float:
    """``value`` as a finite float of any sign."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


def probability(name: str, value) -> float:
    """``value`` as a float in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {shown(value)}")
    return float(value)


def value_range(name: str, value, positive: bool = False) -> Tuple[float, float]:
    """``value`` as a finite pair ``(lo, hi)`` with ``lo <= hi`` (and ``lo > 0`` when ``positive``)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {shown(value)}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a pair (lo, hi) with lo <= hi, got {shown(value)}")
    if positive and not lo > 0:
        raise ValueError(f"{name} must lie in (0, inf), got {shown(value)}")
    return lo, hi


def tensor_range(t: torch.Tensor) -> Tuple[float, float]:
    """``(min, max)`` of ``t`` as floats, in one pass (``aminmax``, about 15 times cheaper than
    ``isfinite(t).all()`` on a CPU) and one host sync: NaN in ``t`` makes both NaN and an Inf is one of
    them, so ``math.isfinite`` of the two checks ``t`` too. ``(0.0, 0.0)`` for an empty ``t``."""
    if t.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()
    return lo, hi


def seed(name: str, value) -> int:
    """``value`` as an int (any sign): a seed for ``torch.Generator.manual_seed``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {shown(value)}")
    return value


def class_labels(name: str, labels, length: Optional[int] = None, num_classes: Optional[int] = None,
                 device: Optional[torch.device] = None, in_step: bool = False) -> torch.Tensor:
    """The one label checker: ``labels`` as an int64 tensor ``[length]`` of class indices.

    Raises a TypeError naming ``name`` for a non-tensor or a non-integer dtype, a ValueError for a wrong
    shape, another device than ``device``, or a value outside ``[0, num_classes)`` (or below 0 when
    ``num_classes`` is None). Lists and arrays are accepted and converted. ``in_step``: called inside an
    op or a loss (every step), where the value range is read only while checks are on (it is a host
    synchronisation); at an entry point (``in_step=False``) it is always read."""
    if not isinstance(labels, torch.Tensor):
        text = _first_string(labels)
        if text is not None:
            raise TypeError(f"{name} must be class indices 0..C-1, got strings such as {text!r}: map the class "
                            "names to indices first (e.g. sorted names -> 0, 1, ...)")
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor of class indices, got {type(labels).__name__}") from None
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 class indices), got {labels.dtype}")
    if labels.dim() != 1 or (length is not None and labels.shape[0] != length):
        want = f"[{length}]" if length is not None else "[N]"
        raise ValueError(f"{name} must have shape {want} (one label per image), got {tuple(labels.shape)}")
    if device is not None and labels.device != torch.device(device):
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    if labels.numel() and (not in_step or checks_enabled()):
        lo, hi = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if lo < 0:
            raise ValueError(f"{name} must be >= 0, found {lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), found {hi}")
    return labels if labels.dtype == torch.int64 else labels.long()


def _first_string(values):
    """The first str/bytes of a label sequence (a list, tuple or numpy array), else None."""
    if isinstance(values, (str, bytes)):
        return values
    kind = getattr(getattr(values, "dtype", None), "kind", None)
    if kind in ("U", "S"):
        return values.flat[0].item() if values.size else ""
    if kind == "O" or isinstance(values, (list, tuple)):
        return next((v for v in values if isinstance(v, (str, bytes))), None)
    return None


def features(z, y, zname: str = "zs", yname: str = "ys", dim: Optional[int] = None,
             num_classes: Optional[int] = None) -> None:
    """The inputs of a loss over features: ``z`` finite floating ``[N, D]`` (``D == dim`` when given) and
    ``y`` integer ``[N]`` on the same device (in ``[0, num_classes)`` when given); errors name both."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"{zname} must be a floating tensor [N, D], got "
                         f"{getattr(z, 'dtype', type(z).__name__)} {tuple(getattr(z, 'shape', ()))}")
    if dim is not None and z.shape[1] != dim:
        raise ValueError(f"{zname} has feature dimension {z.shape[1]}, the real statistics have {dim}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"{yname} must be a tensor [{z.shape[0]}] of class indices, got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{yname} must hold integer class indices, got {y.dtype}")
    if y.device != z.device:
        raise ValueError(f"{yname} is on {y.device} but {zname} is on {z.device}")
    if z.shape[0] == 0:
        raise ValueError(f"{zname} is empty")
    if num_classes is not None:
        class_labels(yname, y, z.shape[0], num_classes, z.device, in_step=True)
    finite(zname, z)


def finite(name: str, t: torch.Tensor) -> None:
    """Raise when ``t`` holds NaN or Inf (data-dependent: skipped with FASTDD_CHECKS=0).

    One sum (fp32, fp64 for fp64 inputs): NaN and Inf propagate into it, and it allocates nothing of
    ``t``'s size (``isfinite(t).all()`` would build a bool copy: ~1 GB for a 1.28M x 768 bank). Only a
    non-finite sum, which finite values can also give by overflow, is confirmed element by element."""
    if not checks_enabled() or t.numel() == 0:
        return
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def output_path(name: str, path) -> Path:
    """``path`` as a Path, refused up front if it cannot be written later: it is a directory, a file
    stands where a parent folder should be, or the nearest existing folder (where the missing ones would
    be created) refuses a new file. That is tried for real, with a probe file created and removed at
    once (permission bits alone say nothing for root, a read-only mount or a full disk of inodes);
    otherwise a long run would fail only when saving."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a directory: give a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are created when saving
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name}={str(path)!r} cannot be written: {str(folder)!r} is a file, not a folder")
    probe = folder / f".fastdd-write-check.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        where = "" if folder == path.parent else " (where its missing folders would be created)"
        raise ValueError(f"{name}={str(path)!r} cannot be written: no file can be created in "
                         f"{str(folder)!r}{where}: {e.strerror or e}") from None
    try:
        os.unlink(probe)
    except OSError:
        pass
    return path


def input_file(name: str, path) -> Path:
    """``path`` as a Path to an existing file, else a ValueError naming ``name`` (a folder given where a
    file is expected says so, instead of a 'no such file' from deep inside)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a folder: give a file")
    if not path.exists():
        raise ValueError(f"{name}={str(path)!r} does not exist")
    return path


def one_of(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {shown(value)}")
    return value
