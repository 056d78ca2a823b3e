"""``DistilledSet``: the result of ``fastdd.distill`` (images, labels, the method and its settings, the
loss history), saved and loaded through fastdd's checked file format (``fastdd.files``): a safetensors
file by default (any safetensors client reads its ``images`` and ``labels``, and the rest as JSON metadata),
and the torch zip files of earlier fastdd versions still load."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .files import load_checked, save_checked

__all__ = ["DistilledSet", "DISTILLED_FORMAT", "DISTILLED_VERSION"]

DISTILLED_FORMAT, DISTILLED_VERSION = "fastdd.DistilledSet", 1


@dataclass
class DistilledSet:
    """A distilled set: ``images`` float ``[C*ipc, 3, H, W]`` in [0, 1] (class-major; checked: finite, in
    [0, 1]), ``labels`` int64,
    the ``method``, the ``settings`` it was made with (every argument of ``distill`` after defaults), and
    the loss ``history`` (one float per step). Unpacks as ``images, labels = distilled``."""

    images: torch.Tensor
    labels: torch.Tensor
    method: str
    settings: Dict[str, Any] = field(default_factory=dict)
    history: List[float] = field(default_factory=list)
    classes: Optional[List[str]] = None  # the class names distill was given (ImageFolder's, a Split's)

    def __post_init__(self):
        if self.images.dim() != 4 or self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"images [N,3,H,W] and labels [N] do not match: {tuple(self.images.shape)}, "
                             f"{tuple(self.labels.shape)}")
        if not self.images.is_floating_point():
            raise ValueError(f"images must be floating point with values in [0, 1], got {self.images.dtype} "
                             "(0..255 pixels: divide by 255)")
        if self.images.numel():
            if not bool(torch.isfinite(self.images).all()):
                raise ValueError("images hold NaN or Inf: values must be finite, in [0, 1]")
            lo, hi = float(self.images.min()), float(self.images.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"images must hold values in [0, 1], found [{lo:.4g}, {hi:.4g}]"
                                 + (" (0..255 pixels: divide by 255)" if hi > 1.5 else ""))
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

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        """``(image [3, H, W], label)``: a map-style dataset, so ``DataLoader(out)`` works (iterating the
        set itself unpacks it, ``images, labels = out``)."""
        return self.images[index], int(self.labels[index])

    def save_images(self, folder: Union[str, os.PathLike]):
        """The ImageFolder layout: ``folder/<class name>/<index>.png`` (``export(folder, "folder")``)."""
        return self.export(folder, "folder")

    def save_grid(self, path: Union[str, os.PathLike], padding: int = 2):
        """One PNG, a row per class (``export(path, "grid")``)."""
        return self.export(path, "grid", padding=padding)

    def export(self, path: Union[str, os.PathLike], format: str, **kwargs):
        """Write the set as ``format``: ``"folder"`` (ImageFolder of PNGs), ``"grid"`` (one PNG),
        ``"lgm"`` (LGM's and SFM's ``data.pth``) or ``"dcbench"`` (``images_best.pt`` and
        ``labels_best.pt``); see ``fastdd.export``."""
        from .export import export

        return export(self, path, format, **kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def ipc(self) -> int:
        return self.images.shape[0] // self.num_classes

    def save(self, path: Union[str, os.PathLike], container: str = "safetensors") -> None:
        """Write to ``path`` (format version, checksum, atomic) as a safetensors file (tensors ``images``
        and ``labels``; the method, settings, history and class names as JSON in its metadata), or with
        ``container="torch"`` as the torch zip file of earlier fastdd versions (see ``fastdd.files``)."""
        save_checked({"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "method": self.method,
                      "settings": self.settings, "history": [float(v) for v in self.history],
                      "classes": None if self.classes is None else [str(c) for c in self.classes]},
                     path, DISTILLED_FORMAT, DISTILLED_VERSION, container=container)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "DistilledSet":
        """Read a file written by ``save`` (either container, told by its first bytes);
        ``CorruptFileError`` if it is truncated or altered."""
        p = load_checked(path, DISTILLED_FORMAT, DISTILLED_VERSION)
        return cls(p["images"], p["labels"], p["method"], p["settings"], list(p["history"]), p.get("classes"))

    def __repr__(self) -> str:
        return (f"DistilledSet(method={self.method!r}, images={tuple(self.images.shape)}, "
                f"classes={self.num_classes}, steps={len(self.history)})")
