"""Distilled sets in the formats other tools read, and back.

Writers (``DistilledSet.export(path, format)`` or the functions below; ``fastdd export`` on the command
line):

- ``"folder"``: torchvision's ImageFolder layout, one sub-folder per class (the class names when the set
  has them, else ``class_000`` ...), one PNG per image (8-bit RGB, ``<class>/<index>.png``); a class name
  that is not one path component is written as a safe folder name: ``/``, the OS's path separators and
  NUL replaced by ``_``, and ``""``, ``"."``, ``".."`` as ``"_"``, ``"_"``, ``"__"`` (``"T-shirt/top"`` ->
  ``T-shirt_top``), which is the name reading the folder back gives;
- ``"grid"``: one PNG with a row per class (for a look at the set);
- ``"lgm"``: LGM's and SFM's ``data.pth``, ``{"images": [N,3,H,W] float in [0,1], "labels": [N] int64}``;
- ``"dcbench"``: DC-Bench's and DD-Ranking's ``images_best.pt`` and ``labels_best.pt`` in a folder (the
  images in [0, 1]; pass ``mean`` and ``std`` to store them normalised, as those codebases train on).

Nothing is merged into or replaced silently: the folder formats (``folder``, ``dcbench``) write into a
new or empty folder, and the file formats (``grid``, ``lgm``) replace an existing file only of their own
format (a PNG, an LGM ``data.pth``), atomically; anything else is refused before anything is written
(``check_destination``).

``load(path)`` reads any of them back (a fastdd ``DistilledSet`` file too) as a ``DistilledSet``, rows
sorted class-major; every tensor file is read with ``weights_only=True``, so loading runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .files import atomic_write, load_tensors
from .validate import finite_float, positive_float, shown

__all__ = ["FORMATS", "save_folder", "save_grid", "save_lgm", "save_dcbench", "load", "export",
           "check_destination"]

FORMATS = ("folder", "grid", "lgm", "dcbench")
_FOLDER_FORMATS = ("folder", "dcbench")  # the others write one file
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PathLike = Union[str, os.PathLike]


def _class_names(distilled) -> Sequence[str]:
    names = getattr(distilled, "classes", None)
    if names:
        return list(names)
    return [f"class_{c:03d}" for c in range(distilled.num_classes)]


def _folder_name(name: str) -> str:
    """``name`` as one path component: ``/``, ``os.sep``, ``os.altsep`` and NUL replaced by ``_``;
    ``""``, ``"."`` and ``".."`` as ``"_"``, ``"_"`` and ``"__"``."""
    for bad in {"/", os.sep, os.altsep, "\0"} - {None}:
        name = name.replace(bad, "_")
    return "_" * max(1, len(name)) if name in ("", ".", "..") else name


def _folder_names(names: Sequence[str]) -> list:
    """The folder of each class name (``_folder_name``); a ValueError naming the classes that share one."""
    folders = [_folder_name(str(n)) for n in names]
    shared = {}
    for name, folder in zip(names, folders):
        shared.setdefault(folder, []).append(name)
    clashes = [f"{' and '.join(map(repr, group))} -> {folder!r}" for folder, group in shared.items() if len(group) > 1]
    if clashes:
        raise ValueError(f"class names must give distinct folder names: {'; '.join(clashes[:5])}")
    return folders


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE


def _is_lgm_file(path: Path) -> bool:
    """Whether ``path`` is an LGM/SFM ``data.pth`` (a torch file of ``{"images", "labels", ...}``); its
    tensors are mapped, not read."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file at all
        return False
    return isinstance(record, dict) and "images" in record and "labels" in record


def check_destination(path: PathLike, format: str) -> Path:
    """``path`` as a Path, refused with a ValueError naming it, before anything is written, where the
    export would merge into or replace something else: for the folder formats (``folder``, ``dcbench``)
    an existing file or a folder that is not empty; for the file formats (``grid``, ``lgm``) a folder or
    an existing file of another format (a file of the same format, a PNG or an LGM ``data.pth``, is
    replaced atomically); for all, a file standing where a parent folder should be."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {shown(format)}")
    path = Path(path)
    if format in _FOLDER_FORMATS:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{str(path)!r} is a file, but the {format} format writes a folder: choose another "
                             "path or remove the file")
        if path.is_dir() and any(path.iterdir()):
            raise ValueError(f"{str(path)!r} is a folder that is not empty (the {format} export would be mixed "
                             "with what it holds): choose a new or empty folder, or remove it")
    elif path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, but the {format} format writes one file: give a file path")
    elif path.exists() and not (_is_png(path) if format == "grid" else _is_lgm_file(path)):
        raise ValueError(f"{str(path)!r} exists and is not {'a PNG' if format == 'grid' else 'an LGM data.pth'} "
                         "file (the export would replace it): choose another path or remove it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # missing folders are created
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder")
    return path


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N,3,H,W]`` in [0, 1] -> ``[N,H,W,3]`` uint8 (rounded)."""
    return (images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as f:
        Image.fromarray(pixels, mode="RGB").save(f, format="PNG")


def save_folder(distilled, folder: PathLike) -> Path:
    """The ImageFolder layout: ``folder/<class name>/<index>.png`` (a class name that is not one path
    component as its safe folder name, see the module docstring), in a new or empty ``folder``; returns
    the folder."""
    names = _folder_names(_class_names(distilled))
    folder = check_destination(folder, "folder")
    pixels = _to_uint8(distilled.images)
    for i, label in enumerate(distilled.labels.tolist()):
        _write_png(folder / names[label] / f"{i:05d}.png", pixels[i])
    return folder


def save_grid(distilled, path: PathLike, padding: int = 2) -> Path:
    """One PNG: a row per class, its ipc images side by side, ``padding`` white pixels between them (an
    existing PNG at ``path`` is replaced)."""
    check_destination(path, "grid")
    c, k = distilled.num_classes, distilled.ipc
    _, _, h, w = distilled.images.shape
    grid = np.full((c * (h + padding) + padding, k * (w + padding) + padding, 3), 255, dtype=np.uint8)
    pixels = _to_uint8(distilled.images)
    for i in range(c * k):
        row, col = divmod(i, k)
        y, x = padding + row * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i]
    _write_png(Path(path), grid)
    return Path(path)


def _normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    if mean is None and std is None:
        return images
    if mean is None or std is None:
        raise ValueError("give mean and std together (per channel), or neither")
    mean, std = [finite_float("mean", v) for v in mean], [positive_float("std", v) for v in std]
    if {len(mean), len(std)} - {1, images.shape[1]}:
        raise ValueError(f"mean and std must hold 1 or {images.shape[1]} values (one per channel), got "
                         f"{len(mean)} and {len(std)}")
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def save_lgm(distilled, path: PathLike) -> Path:
    """LGM's and SFM's ``data.pth``: ``{"images": [N,3,H,W] in [0,1], "labels": [N]}`` (an existing
    ``data.pth`` at ``path`` is replaced)."""
    check_destination(path, "lgm")
    with atomic_write(path) as f:
        torch.save({"images": distilled.images.detach().cpu().float(), "labels": distilled.labels.cpu().long()}, f)
    return Path(path)


def save_dcbench(distilled, folder: PathLike, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> Path:
    """DC-Bench / DD-Ranking: ``folder/images_best.pt`` and ``folder/labels_best.pt``, in a new or empty
    ``folder``; ``mean`` and ``std`` (1 or 3 values, per channel; std > 0) store ``(images - mean) / std``."""
    folder = check_destination(folder, "dcbench")
    images = _normalised(distilled.images.detach().cpu().float(), mean, std)
    with atomic_write(folder / "images_best.pt") as f:
        torch.save(images, f)
    with atomic_write(folder / "labels_best.pt") as f:
        torch.save(distilled.labels.cpu().long(), f)
    return folder


def export(distilled, path: PathLike, format: str, **kwargs) -> Path:
    """Write ``distilled`` to ``path`` in ``format`` (one of ``FORMATS``)."""
    writers = {"folder": save_folder, "grid": save_grid, "lgm": save_lgm, "dcbench": save_dcbench}
    if format not in writers:
        raise ValueError(f"format must be one of {FORMATS}, got {shown(format)}")
    return writers[format](distilled, path, **kwargs)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

def _read_folder(folder: Path) -> Tuple[torch.Tensor, torch.Tensor, list]:
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for file in sorted((folder / name).iterdir()):
            if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                with Image.open(file) as im:
                    images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
                labels.append(c)
    if not images:
        raise ValueError(f"{folder} holds no image in class sub-folders (the ImageFolder layout)")
    if len({tuple(t.shape) for t in images}) > 1:
        raise ValueError(f"{folder}: the images have different sizes")
    return torch.stack(images).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels), classes


def _read(path: Path, mean, std) -> Tuple[torch.Tensor, torch.Tensor, Optional[list], str]:
    """``(images, labels, class names or None, format)`` of any supported file or folder."""
    if path.is_dir():
        if (path / "images_best.pt").is_file():
            images = load_tensors(path / "images_best.pt")
            if not (path / "labels_best.pt").is_file():
                raise ValueError(f"{path} has images_best.pt but no labels_best.pt beside it")
            return _denormalised(images, mean, std, path), load_tensors(path / "labels_best.pt"), None, "dcbench"
        images, labels, classes = _read_folder(path)
        return images, labels, classes, "folder"
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.name == "images_best.pt":
        return _read(path.parent, mean, std)
    record = load_tensors(path)
    if isinstance(record, dict) and "images" in record and "labels" in record:
        return _denormalised(record["images"], mean, std, path), record["labels"], None, "lgm"
    raise ValueError(f"{path} is neither a fastdd DistilledSet, an LGM/SFM data.pth ({{'images', 'labels'}}) "
                     "nor a DC-Bench images_best.pt")


def _denormalised(images, mean, std, path: Path) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{path}: images must be a float tensor [N, 3, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give mean and std together (per channel), or neither")
        images = images * torch.as_tensor(std).view(1, -1, 1, 1) + torch.as_tensor(mean).view(1, -1, 1, 1)
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{path}: image values lie in [{lo:.3g}, {hi:.3g}], not [0, 1]: if they were stored "
                         "normalised, pass the mean and std they were normalised with")
    return images.clamp(0, 1).float()


def load(path: PathLike, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """A ``DistilledSet`` from a fastdd file, an LGM/SFM ``data.pth``, a DC-Bench folder (or its
    ``images_best.pt``) or an ImageFolder of images; the rows are sorted class-major (stably)."""
    from .distilled import DistilledSet

    path = Path(path)
    if path.is_file() and path.name != "images_best.pt":
        record = load_tensors(path)
        if isinstance(record, dict) and "format" in record:  # fastdd's own: kind, version, checksum checked
            return DistilledSet.load(path)
    images, labels, classes, kind = _read(path, mean, std)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"{path}: labels must be integers [{images.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    order = torch.argsort(labels, stable=True)
    return DistilledSet(images[order].contiguous(), labels[order].long(), f"imported:{kind}",
                        {"source": str(path), "format": kind}, [], classes=classes)
