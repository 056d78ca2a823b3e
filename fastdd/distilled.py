"""``DistilledSet``: the result of ``fastdd.distill`` (images, labels, the method and its settings, the
loss history), saved and loaded through fastdd's checked file format (``fastdd.files``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

import torch

from .files import load_checked, save_checked

__all__ = ["DistilledSet", "DISTILLED_FORMAT", "DISTILLED_VERSION"]

DISTILLED_FORMAT, DISTILLED_VERSION = "fastdd.DistilledSet", 1


@dataclass
class DistilledSet:
    """A distilled set: ``images`` float32 ``[C*ipc, 3, H, W]`` in [0, 1] (class-major), ``labels`` int64,
    the ``method``, the ``settings`` it was made with (every argument of ``distill`` after defaults), and
    the loss ``history`` (one float per step). Unpacks as ``images, labels = distilled``."""

    images: torch.Tensor
    labels: torch.Tensor
    method: str
    settings: Dict[str, Any] = field(default_factory=dict)
    history: List[float] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dim() != 4 or self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"images [N,3,H,W] and labels [N] do not match: {tuple(self.images.shape)}, "
                             f"{tuple(self.labels.shape)}")
        # num_classes and ipc are read off the labels: they must be 0..C-1, ipc each, class-major
        n, y = self.labels.shape[0], self.labels
        c = int(y.max()) + 1 if n and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool) else 0
        if c < 1 or n % c or not torch.equal(y.cpu(), torch.arange(c, dtype=y.dtype).repeat_interleave(n // c)):
            raise ValueError(f"labels must be integers, class-major with the same count per class (0,..,0, "
                             f"1,..,1, ..., C-1), got {y.tolist()[:20]}{'...' if n > 20 else ''}")

    def __iter__(self):
        return iter((self.images, self.labels))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def ipc(self) -> int:
        return self.images.shape[0] // self.num_classes

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write to ``path`` (format version, checksum, atomic)."""
        save_checked({"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "method": self.method,
                      "settings": self.settings, "history": [float(v) for v in self.history]},
                     path, DISTILLED_FORMAT, DISTILLED_VERSION)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "DistilledSet":
        """Read a file written by ``save``; ``CorruptFileError`` if it is truncated or altered."""
        p = load_checked(path, DISTILLED_FORMAT, DISTILLED_VERSION)
        return cls(p["images"], p["labels"], p["method"], p["settings"], list(p["history"]))

    def __repr__(self) -> str:
        return (f"DistilledSet(method={self.method!r}, images={tuple(self.images.shape)}, "
                f"classes={self.num_classes}, steps={len(self.history)})")
