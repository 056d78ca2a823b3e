"""``fastdd.distill``: the distillation loop shared by LGM, SFM and CLP, and its result ``DistilledSet``.

One step (METHODS.md's shared pipeline), kept as three separate pieces so the memory-flat backward slots in:

1. **encode**: decode the image parameters into images ``s`` in (0, 1), draw augmentation parameters for
   the K copies (``copies``), and encode ``z_s = phi(A(s))`` (``_encode_rows``);
2. **loss on features**: ``loss = method_loss(z_s, labels, real side)``;
3. **backward into the images**: ``loss.backward()`` then an Adam step. With ``chunk_size`` set, step 3
   becomes memory-flat (``_chunked_backward``): the features are first computed without a graph, the loss
   gradient ``dL/dz_s`` is taken w.r.t. those features, then each chunk of ``chunk_size`` rows is
   re-encoded *with the same augmentation parameters* and back-propagates its slice of ``dL/dz_s``. Peak
   memory then no longer grows with ``ipc * C * K``; the gradient equals the plain one up to float
   summation order (tested).

Real side: SFM and CLP touch no real image while distilling: ``RealStats`` (class means; CLP adds a
feature bank) are computed once by one streamed encoder pass, or given as ``stats=``. The reference LGM is
faithful: every step a fresh class-balanced real batch of ``ipc * K`` images per class, each augmented
once, goes through the encoder without a graph, and a fresh random head ``W ~ N(0, 0.01^2)``, ``b = 0``.

Randomness: one generator on the CPU (real-batch indices, CLP's bank rows, real init) and one on the
device (initial noise, augmentation, LGM heads), both seeded from ``seed`` and saved in checkpoints, so a
resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .augment import Augment, AugmentParams, CROP_LOG_RATIO, CROP_SCALE, FLIP_PROB, NOISE_MEAN, NOISE_PROB, \
    NOISE_STD
from .images import PARAMETERIZATIONS, images_from_state, make_images
from .methods._checks import positive_float, positive_int
from .methods.clp import FEATURE_NORMS, ClosedFormProbeLoss
from .methods.lgm import LinearGradientMatchingLoss
from .methods.sfm import FlowMatchingLoss
from .stats import CorruptFileError, RealStats, load_checked, resolve_encoder, save_checked

__all__ = ["distill", "DistilledSet", "METHODS", "INITS", "METHOD_DEFAULTS", "CorruptFileError",
           "StatsMismatchWarning"]

METHODS = ("lgm", "sfm", "clp")
INITS = ("noise", "real", "centroid")
DISTILLED_FORMAT, DISTILLED_VERSION = "fastdd.DistilledSet", 1
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fastdd.Checkpoint", 1


class StatsMismatchWarning(UserWarning):
    """``stats=`` hold other per-class counts than the real data given to ``distill``: statistics of
    another data set (a wrong result), or of a larger set than the images passed (intended: e.g. a
    feature bank of the whole training set with a subset of its images for the initialisation)."""

# Per-method defaults for every argument left as None, chosen by measurement (scripts/calibrate.py,
# benchmarks/results/calibration_*.md: Fashion-MNIST at 32 px, MobileNetV2, ipc 1, CPU). The published
# recipes (pyramid from noise, LGM's augmentation chain, lr 2e-3) end below random real images there:
# starting from real images is the largest lever (after 200 steps: SFM 10 -> 52 %, CLP 10 -> 55 %; LGM
# 8 % with its published recipe, 51 % from real images with the milder chain), the milder chain (crop
# scale [0.5, 1], no noise) beats LGM's (CLP 55 vs 46 %, SFM 52 vs 50 %), lr 1e-2 is
# the best of 3e-3..1e-1. All three methods share them, so a comparison differs in the loss alone; LGM
# keeps its algorithm (K = 10 copies, a fresh real batch and a fresh head every step). The published LGM
# recipe is init="noise", lr=2e-3, crop_scale=CROP_SCALE, noise_prob=NOISE_PROB, steps=5000.
_CALIBRATED = dict(steps=1000, lr=1e-2, init="real", parameterization="pyramid", extend_every=200,
                   crop_scale=(0.5, 1.0), noise_prob=0.0)
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "lgm": dict(_CALIBRATED, copies=10),
    "sfm": dict(_CALIBRATED, copies=1),
    "clp": dict(_CALIBRATED, copies=1),
}


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------

def _probability(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _range(name: str, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a pair (lo, hi) with lo <= hi, got {value!r}")
    return lo, hi


def _resolve_device(device, encoder) -> torch.device:
    """``device`` checked (the CPU or a CUDA device this machine has), else the encoder module's device,
    else CUDA when available. Called before anything is moved: a bad device must not leave the user's
    module on it."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a device") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r}: CUDA is not available on this machine (use 'cpu')")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
        elif dev.type != "cpu":
            raise ValueError(f"device={device!r}: fastdd runs on 'cpu' or 'cuda' devices")
        return dev
    if isinstance(encoder, torch.nn.Module):
        for t in list(encoder.parameters()) + list(encoder.buffers()):
            return t.device
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_output_path(name: str, path) -> Path:
    """``path`` as a Path, refused up front if it cannot be written later (it is a directory, or a file
    stands where a parent folder should be): otherwise a long run would fail only when saving."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a directory: give a file path")
    folder = path.parent
    while not folder.exists():  # missing folders are created when saving
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name}={str(path)!r} cannot be written: {str(folder)!r} is a file, not a folder")
    return path


def _indexable(source):
    """The map-style dataset (or tensor) behind ``source``, or None for iterable-only sources."""
    if isinstance(source, torch.Tensor):
        return source
    if isinstance(source, torch.utils.data.DataLoader):
        source = source.dataset
    if isinstance(source, torch.utils.data.IterableDataset):
        return None
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return source
    return None


# --------------------------------------------------------------------------------------------------
# Real data: one cheap pass (labels, counts, shape, random real images per class)
# --------------------------------------------------------------------------------------------------

class _SmallestPerClass:
    """Keep, per class, the ``k`` items with the smallest keys seen so far (streaming).

    Random keys give a uniform sample without replacement per class; distances to the class mean give
    the ``k`` nearest real images (the "centroid" initialisation)."""

    def __init__(self, k: int, num_classes: int):
        self.k, self.num_classes = k, num_classes
        self.keys = torch.full((num_classes, k), math.inf, dtype=torch.float64)
        self.items: Optional[torch.Tensor] = None

    def update(self, keys: torch.Tensor, labels: torch.Tensor, items: torch.Tensor) -> None:
        keys, labels, items = keys.double().cpu(), labels.cpu(), items.detach().cpu().float()
        grow = int(labels.max()) + 1 - self.num_classes  # classes revealed by a stream: add empty slots
        if grow > 0:
            self.num_classes += grow
            self.keys = torch.cat([self.keys, torch.full((grow, self.k), math.inf, dtype=torch.float64)])
            if self.items is not None:
                self.items = torch.cat([self.items, self.items.new_zeros(grow, *self.items.shape[1:])])
        if self.items is None:
            self.items = torch.zeros(self.num_classes, self.k, *items.shape[1:])
        for c in torch.unique(labels).tolist():
            mask = labels == c
            all_keys = torch.cat([self.keys[c], keys[mask]])
            all_items = torch.cat([self.items[c], items[mask]])
            best = torch.topk(all_keys, self.k, largest=False).indices
            self.keys[c], self.items[c] = all_keys[best], all_items[best]

    def result(self) -> torch.Tensor:
        """``[C*k, ...]`` class-major, each class's items in increasing key order."""
        order = torch.argsort(self.keys, dim=1)
        items = torch.stack([self.items[c][order[c]] for c in range(self.num_classes)])
        return items.reshape(self.num_classes * self.k, *self.items.shape[2:])


@dataclass
class _Survey:
    labels: torch.Tensor           # int64 [N] in the source's order
    counts: torch.Tensor           # int64 [C]
    image_size: Tuple[int, int]
    samples: Optional[torch.Tensor]  # [C*ipc, 3, H, W] random real images (init="real") or None


def _survey(source, labels, num_classes: Optional[int], batch_size: int, sample_per_class: int,
            generator: torch.Generator, progress: bool) -> _Survey:
    """One pass over the real data without the encoder: validation, labels, counts, image size."""
    from tqdm.auto import tqdm

    from .data import iterate_batches

    label_chunks, size = [], None
    reservoir = None
    bar = tqdm(desc="scanning real data", unit="img", disable=not progress, leave=False)
    for i, (images, ys) in enumerate(iterate_batches(source, labels, batch_size=batch_size)):
        if size is None:
            size = tuple(images.shape[-2:])
        elif tuple(images.shape[-2:]) != size:
            raise ValueError(f"images: all real images must have one size; batch {i} has "
                             f"{tuple(images.shape[-2:])}, earlier ones {size}")
        if num_classes is not None and int(ys.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}), found {int(ys.max())}")
        label_chunks.append(ys)
        if sample_per_class:
            if reservoir is None:
                reservoir = _SmallestPerClass(sample_per_class, num_classes or 1)
            reservoir.update(torch.rand(ys.shape[0], generator=generator, dtype=torch.float64), ys, images)
        bar.update(ys.shape[0])
    bar.close()
    all_labels = torch.cat(label_chunks)
    c = num_classes if num_classes is not None else int(all_labels.max()) + 1
    counts = torch.bincount(all_labels, minlength=c)
    samples = None
    if sample_per_class and not bool((counts < sample_per_class).any()):  # else _check_classes reports it
        samples = reservoir.result()
    return _Survey(all_labels, counts, size, samples)


def _check_classes(counts: torch.Tensor, ipc: int, name: str = "labels") -> None:
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"{name}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no real image "
                         f"(empty classes); relabel to 0..C-1 or pass the right num_classes")
    smallest = int(counts.min())
    if ipc > smallest:
        c = int(torch.argmin(counts))
        raise ValueError(f"ipc={ipc} is larger than class {c}, which has only {smallest} real images")


def _nearest_to_means(source, labels, encoder, means: torch.Tensor, k: int, batch_size: int,
                      device, progress: bool) -> torch.Tensor:
    """The ``k`` real images nearest (Euclidean, in feature space) to each class mean, class-major."""
    from tqdm.auto import tqdm

    from .data import iterate_batches

    keep = _SmallestPerClass(k, means.shape[0])
    means = means.to(device)
    bar = tqdm(desc="finding class centroids", unit="img", disable=not progress, leave=False)
    for images, ys in iterate_batches(source, labels, batch_size=batch_size):
        with torch.no_grad():
            z = encoder(images.to(device))
        d = (z - means[ys.to(device)]).pow(2).sum(1)
        keep.update(d, ys, images)
        bar.update(ys.shape[0])
    bar.close()
    return keep.result()


class _RealBatches:
    """Class-balanced random real batches for LGM, drawn by index from a tensor or map-style dataset."""

    def __init__(self, source, labels_all: torch.Tensor, labels_tensor, num_classes: int):
        self.source = source
        self.labels_tensor = labels_tensor
        order = torch.argsort(labels_all, stable=True)
        counts = torch.bincount(labels_all, minlength=num_classes)
        self.by_class = list(torch.split(order, counts.tolist()))

    def sample(self, per_class: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        from .data import iterate_batches

        picks = []
        for idx in self.by_class:
            if per_class <= idx.numel():  # without replacement when the class is large enough
                picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
            else:
                picks.append(idx[torch.randint(idx.numel(), (per_class,), generator=generator)])
        idx = torch.cat(picks)
        if isinstance(self.source, torch.Tensor):
            batch = iterate_batches(self.source[idx], torch.as_tensor(self.labels_tensor)[idx],
                                    batch_size=idx.numel())
        else:
            batch = iterate_batches(torch.utils.data.Subset(self.source, idx.tolist()), batch_size=idx.numel())
        return next(iter(batch))


# --------------------------------------------------------------------------------------------------
# The three pieces of a step
# --------------------------------------------------------------------------------------------------

def _encode_rows(encoder, augment: Augment, images: torch.Tensor, params: AugmentParams, lo: int, hi: int,
                 autocast_dtype=None) -> torch.Tensor:
    """Features of augmented rows ``lo..hi-1`` of the K-times repeated set (row r is image ``r % N``)."""
    n = images.shape[0]
    rows = torch.arange(lo, hi, device=images.device) % n
    x = augment.apply(images[rows], params[lo:hi])
    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            return encoder(x).float()
    return encoder(x).float()


def _plain_backward(encoder, augment, images, params, loss_fn, autocast_dtype=None) -> torch.Tensor:
    """Encode all rows with a graph, take the loss, back-propagate into ``images``' parameters."""
    zs = _encode_rows(encoder, augment, images, params, 0, len(params), autocast_dtype)
    loss = loss_fn(zs)
    loss.backward()
    return loss.detach()


def _chunked_backward(encoder, augment, images, params, loss_fn, chunk_size: int,
                      autocast_dtype=None) -> torch.Tensor:
    """Memory-flat version of ``_plain_backward`` (same gradient; see the module docstring)."""
    total = len(params)
    leaf = images.detach().requires_grad_(True)
    with torch.no_grad():
        zs = torch.cat([_encode_rows(encoder, augment, leaf, params, lo, min(lo + chunk_size, total),
                                     autocast_dtype) for lo in range(0, total, chunk_size)])
    zs.requires_grad_(True)
    loss = loss_fn(zs)
    (grad_z,) = torch.autograd.grad(loss, zs)
    for lo in range(0, total, chunk_size):
        hi = min(lo + chunk_size, total)
        z = _encode_rows(encoder, augment, leaf, params, lo, hi, autocast_dtype)
        z.backward(grad_z[lo:hi])
    if images.requires_grad:
        images.backward(leaf.grad)
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

# settings that must match for a checkpoint to be resumed (the rest, e.g. steps and lr, may change);
# class_counts and encoder tell another data set or encoder apart (same counts and name pass: a cheap check)
_RESUME_KEYS = ("method", "ipc", "num_classes", "image_size", "parameterization", "copies", "init", "seed",
                "feature_dim", "class_counts", "encoder")


def _save_checkpoint(path, step, images, optimizer, history, cpu_gen, dev_gen, settings) -> None:
    save_checked({"step": step, "images": images.get_state(), "optimizer": optimizer.state_dict(),
                  "history": [float(v) for v in history], "cpu_rng": cpu_gen.get_state(),
                  "device_rng": dev_gen.get_state().cpu(), "settings": settings},
                 path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def _load_checkpoint(path, settings) -> dict:
    ck = load_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    saved = ck.get("settings", {})
    # a key a checkpoint of an earlier fastdd lacks (class_counts) cannot be compared: it is not held against it
    diff = {k: (saved[k], settings.get(k)) for k in _RESUME_KEYS if k in saved and saved[k] != settings.get(k)}
    if diff:
        raise ValueError(f"checkpoint {path} was made with other settings {diff} (saved, now): "
                         "use another checkpoint path, or delete it to start afresh")
    return ck


def _raise_if_not_finite(error: Exception, step: int, zs: torch.Tensor, zr: Optional[torch.Tensor] = None) -> None:
    """After the loss raised ``error``: if the encoder's features hold NaN/Inf, say so instead. Checked
    only on that error path, so a healthy step costs nothing extra."""
    for side, z in (("synthetic", zs), ("real", zr)):
        if z is not None and not bool(torch.isfinite(z.detach()).all()):
            raise ValueError(f"the encoder returned NaN or Inf features for the {side} images at step {step}: "
                             "check the encoder (and lower lr if the synthetic images diverged)") from error


def _flush_losses(pending: List[torch.Tensor], history: List[float], method: str, done: int) -> None:
    """Move the pending 0-d loss tensors into ``history``; raise on a non-finite loss."""
    values = torch.stack(pending).cpu().tolist()
    pending.clear()
    first = len(history)
    history.extend(values)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise FloatingPointError(f"the {method} loss became {v} at step {done - len(values) + i} "
                                     f"(history entry {first + i}): lower lr or check the encoder")


# --------------------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------------------

def distill(images, encoder, method: str = "clp", labels=None, ipc: int = 1, steps: Optional[int] = None, *,
            num_classes: Optional[int] = None,
            lr: Optional[float] = None,
            init: Optional[str] = None,
            parameterization: Optional[str] = None,
            extend_every: Optional[int] = None,
            copies: Optional[int] = None,
            augment: bool = True,
            crop_size=None,
            flip_prob: float = FLIP_PROB,
            crop_scale: Optional[Sequence[float]] = None,
            crop_log_ratio: Sequence[float] = CROP_LOG_RATIO,
            noise_prob: Optional[float] = None,
            noise_mean: float = NOISE_MEAN,
            noise_std: float = NOISE_STD,
            lam: float = 1.0,
            tau: float = 0.1,
            real_batch: Optional[int] = 4096,
            relative_lam: bool = True,
            centered_targets: bool = True,
            feature_norm: str = "none",
            probe_bias: bool = False,
            nontarget_denominator: str = "classes",
            head_std: float = 0.01,
            stats: Optional[RealStats] = None,
            bank_dtype: torch.dtype = torch.float16,
            bank_path: Optional[Union[str, os.PathLike]] = None,
            batch_size: int = 256,
            chunk_size: Optional[int] = None,
            autocast_dtype: Optional[torch.dtype] = None,
            seed: int = 0,
            device=None,
            progress: bool = True,
            checkpoint: Optional[Union[str, os.PathLike]] = None,
            checkpoint_every: int = 100,
            resume: bool = True,
            callback: Optional[Callable[[int, float], None]] = None) -> DistilledSet:
    """Distil a labelled image set into ``ipc`` synthetic images per class for linear probing.

    Args:
        images: the real set: a tensor ``[N,3,H,W]`` in [0,1] (with ``labels``), a map-style Dataset
            yielding ``(image, label)`` or a DataLoader yielding ``(images, labels)``; streamed, never
            loaded whole. LGM samples real batches by index, so it needs a tensor or a map-style dataset.
        encoder: a frozen encoder: an ``nn.Module`` ``[B,3,h,w] -> [B,D]`` (wrapped by
            ``fastdd.encoders.wrap``, which adds ImageNet normalisation), a ``FrozenEncoder``, or a name
            for ``fastdd.encoders.load`` (e.g. ``"torchvision:mobilenet_v2"``).
        method: ``"lgm"``, ``"sfm"`` or ``"clp"``.
        labels: int64 ``[N]`` in ``0..C-1`` when ``images`` is a tensor.
        ipc: synthetic images per class. steps: optimisation steps (default 1000).
        num_classes: C (default: max label + 1); every class needs at least ``ipc`` real images.
        lr: Adam's learning rate (default 1e-2 for every method; LGM's published recipe uses 2e-3).
        init: ``"noise"`` (published), ``"real"`` (random real images per class), ``"centroid"`` (the
            ``ipc`` real images nearest each class mean in feature space), or a tensor of initial images
            ``[C*ipc, 3, H, W]`` in [0, 1], class-major (e.g. a baseline computed once for a sweep;
            recorded as ``"given"`` in the settings).
        parameterization: ``"pyramid"`` (LGM's, default) or ``"pixels"``; ``extend_every``: the pyramid's
            extension period in steps (from noise only; see ``fastdd.images``; default 200 as LGM: note that
            32-px images then get their last level only at step 1000).
        copies: K, the augmented copies of the synthetic set per step (default: LGM 10, SFM/CLP 1).
        augment: apply the augmentation chain (False: none). ``crop_size`` (default: the image size),
            ``flip_prob``, ``crop_scale`` (default (0.5, 1) for every method; LGM's published chain:
            (0.08, 1)), ``crop_log_ratio``, ``noise_prob`` (default 0; LGM's published chain: 0.5),
            ``noise_mean``, ``noise_std``: see ``fastdd.augment``. Every ``None`` default comes from
            ``METHOD_DEFAULTS`` (the measured calibration in the README).
        lam, tau, real_batch, relative_lam, centered_targets, feature_norm, probe_bias: CLP's options
            (``fastdd.nn.ClosedFormProbeLoss``; ``probe_bias`` is its ``bias``). ``real_batch``: bank rows
            per step (None: the whole bank).
        nontarget_denominator: SFM's (``"classes"``, or ``"samples"`` for the official code's).
        head_std: LGM's random-head scale.
        stats: precomputed ``RealStats`` (SFM: means; CLP: with a bank), skipping the statistics pass;
            other class counts than the real data's give a ``StatsMismatchWarning``.
        bank_dtype, bank_path: CLP's feature bank dtype, and a file to memory-map it from.
        batch_size: real images per encoder call in the statistics and scanning passes.
        chunk_size: encode and back-propagate at most this many synthetic rows at a time
            (memory-flat backward; None: all at once). Same gradient either way.
        autocast_dtype: run the encoder under ``torch.autocast`` with this dtype (e.g. torch.float16 on
            GPUs, as LGM does); losses always run in fp32.
        seed: seeds every random draw (reproducible on one device and software stack).
        device: where the loop runs, ``"cpu"`` or an available CUDA device (default: the encoder module's
            device; for names CUDA if available).
        progress: tqdm progress bars.
        checkpoint: a file to save the state to every ``checkpoint_every`` steps (atomic) and at the end;
            if it exists and ``resume`` the run continues from it (``steps`` and ``lr`` may change; a
            checkpoint of other settings, another encoder name or data with other class counts is
            refused with a ValueError). The path is checked before any work. A corrupt checkpoint raises
            ``CorruptFileError`` and is left untouched; with ``resume=False`` an existing file is an error.
            Statistics that distill computes are saved beside it (``<checkpoint>.stats``) and reused on
            resume.
        callback: called as ``callback(step, loss)`` after each step (``loss`` a 0-d tensor).

    Returns:
        ``DistilledSet`` with images in [0, 1] ``[C*ipc,3,H,W]`` (class-major), labels, settings, history.
    """
    t_start = time.perf_counter()
    # ---- arguments ------------------------------------------------------------------------------
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    defaults = METHOD_DEFAULTS[method]
    ipc = positive_int("ipc", ipc)
    steps = positive_int("steps", defaults["steps"] if steps is None else steps, minimum=0)
    num_classes = positive_int("num_classes", num_classes, allow_none=True, minimum=2)
    lr = positive_float("lr", defaults["lr"] if lr is None else lr)
    init = defaults["init"] if init is None else init
    given_init = None
    if isinstance(init, torch.Tensor):  # initial images given: [C*ipc, 3, H, W] in [0, 1], class-major
        given_init, init = init, "given"
        if given_init.dim() != 4 or given_init.shape[1] != 3 or not given_init.is_floating_point():
            raise ValueError(f"init given as images must be a float tensor [C*ipc, 3, H, W], got "
                             f"{given_init.dtype} {tuple(given_init.shape)}")
        if not bool(torch.isfinite(given_init).all()) or float(given_init.min()) < 0 or float(given_init.max()) > 1:
            raise ValueError("init given as images must hold finite values in [0, 1]")
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a tensor of images, got {init!r}")
    parameterization = defaults["parameterization"] if parameterization is None else parameterization
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    extend_every = positive_int("extend_every", defaults["extend_every"] if extend_every is None else extend_every)
    copies = positive_int("copies", defaults["copies"] if copies is None else copies)
    crop_scale = _range("crop_scale", defaults["crop_scale"] if crop_scale is None else crop_scale)
    if not 0 < crop_scale[0]:
        raise ValueError(f"crop_scale must lie in (0, inf), got {crop_scale!r}")
    crop_log_ratio = _range("crop_log_ratio", crop_log_ratio)
    flip_prob = _probability("flip_prob", flip_prob)
    noise_prob = _probability("noise_prob", defaults["noise_prob"] if noise_prob is None else noise_prob)
    if crop_size is not None:
        given = crop_size
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        else:
            try:  # not from a string: it would iterate into digits
                crop_size = () if isinstance(crop_size, str) else tuple(int(v) for v in crop_size)
            except (TypeError, ValueError):
                crop_size = ()
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be a positive int or (h, w), got {given!r}")
    for name, v in (("noise_mean", noise_mean), ("noise_std", noise_std)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    lam = positive_float("lam", lam)
    tau = positive_float("tau", tau)
    real_batch = positive_int("real_batch", real_batch, allow_none=True)
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
    if nontarget_denominator not in ("classes", "samples"):
        raise ValueError(f"nontarget_denominator must be 'classes' or 'samples', got {nontarget_denominator!r}")
    head_std = positive_float("head_std", head_std)
    batch_size = positive_int("batch_size", batch_size)
    chunk_size = positive_int("chunk_size", chunk_size, allow_none=True)
    checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
    if autocast_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if stats is not None and not isinstance(stats, RealStats):
        raise ValueError(f"stats must be a fastdd.RealStats, got {type(stats).__name__}")
    if labels is not None and not isinstance(images, torch.Tensor):
        raise ValueError("labels= is only used with a tensor of images; a Dataset or DataLoader yields its own")
    if isinstance(images, torch.Tensor):
        if labels is None:
            raise ValueError("labels is required when images is a tensor")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape [{images.shape[0]}] to match images, "
                             f"got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels must hold integer class indices, got {labels.dtype}")
    if checkpoint is not None:
        checkpoint = _check_output_path("checkpoint", checkpoint)
        if checkpoint.exists() and not resume:
            raise FileExistsError(f"checkpoint {checkpoint} exists and resume=False: delete it or resume")

    dev = _resolve_device(device, encoder)
    encoder = resolve_encoder(encoder, dev)
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=dev).manual_seed(seed + 1)

    # ---- real data: scan, statistics, initial images -------------------------------------------
    lgm_source = None
    scan_source = images
    if method == "lgm":
        lgm_source = _indexable(images)
        if lgm_source is None:
            raise ValueError("images: method='lgm' draws real batches by index, so it needs a tensor or a "
                             "map-style Dataset (or a DataLoader over one), not an iterable-only source")
        scan_source = lgm_source  # labels in index order
    survey = _survey(scan_source, labels, num_classes, batch_size, ipc if init == "real" else 0, cpu_gen, progress)
    counts = survey.counts
    num_classes = counts.shape[0]
    if num_classes < 2:
        raise ValueError(f"labels: distillation needs at least 2 classes, found {num_classes}")
    _check_classes(counts, ipc)
    image_size = survey.image_size

    with torch.no_grad():  # D from one blank image at the real size (cheap; the encoder may resize it)
        probe = encoder(torch.zeros(1, 3, *image_size, device=dev))
    if probe.dim() != 2 or probe.shape[0] != 1:
        raise ValueError(f"encoder must map [B,3,H,W] images to features [B,D], got {tuple(probe.shape)}")
    feature_dim = int(probe.shape[1])

    settings = {
        "method": method, "ipc": ipc, "steps": steps, "num_classes": num_classes, "image_size": list(image_size),
        "feature_dim": feature_dim, "encoder": getattr(encoder, "name", type(encoder).__name__),
        "class_counts": counts.tolist(),
        "lr": lr, "init": init, "parameterization": parameterization, "extend_every": extend_every,
        "copies": copies, "augment": augment, "crop_size": None if crop_size is None else list(crop_size),
        "flip_prob": flip_prob, "crop_scale": list(crop_scale), "crop_log_ratio": list(crop_log_ratio),
        "noise_prob": noise_prob, "noise_mean": float(noise_mean), "noise_std": float(noise_std),
        "lam": lam, "tau": tau, "real_batch": real_batch, "relative_lam": bool(relative_lam),
        "centered_targets": bool(centered_targets), "feature_norm": feature_norm, "probe_bias": bool(probe_bias),
        "nontarget_denominator": nontarget_denominator, "head_std": head_std,
        "bank_dtype": str(bank_dtype), "chunk_size": chunk_size,
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype), "seed": seed,
        "device": str(dev),
    }
    # A checkpoint is checked against this run (method, data's class counts, encoder, ...) before anything
    # saved beside it is reused: a checkpoint of another run must not continue silently.
    resumed = None
    if checkpoint is not None and checkpoint.exists():
        resumed = _load_checkpoint(checkpoint, settings)

    needs_stats = method in ("sfm", "clp") or init == "centroid"
    # With a checkpoint, computed statistics are kept beside it so a resumed run skips the encoder pass.
    stats_file = None if checkpoint is None else checkpoint.with_name(checkpoint.name + ".stats")
    stats_name = "stats"
    if stats is None and needs_stats and resumed is not None and stats_file.exists():
        stats, stats_name = RealStats.load(stats_file), f"statistics file {stats_file}"
    if stats is None and needs_stats:
        stats = RealStats.from_data(images, encoder, labels=labels, num_classes=num_classes,
                                    bank=(method == "clp"), bank_dtype=bank_dtype, bank_path=bank_path,
                                    batch_size=batch_size, device=dev, progress=progress)
        if stats_file is not None:
            stats.save(stats_file)
    if stats is not None:
        if stats.num_classes != num_classes:
            raise ValueError(f"{stats_name} has {stats.num_classes} classes, the labels {num_classes}")
        if stats.feature_dim != feature_dim:
            raise ValueError(f"{stats_name} has feature dimension {stats.feature_dim}, the encoder {feature_dim}")
        if method == "clp" and not stats.has_bank:
            raise ValueError(f"{stats_name}: method='clp' needs statistics with a feature bank (bank=True)")
        stats.require_nonempty(stats_name)
        differ = torch.nonzero(stats.counts != counts).flatten().tolist()
        if differ:  # C and D can match by chance: per-class counts tell other data apart
            warnings.warn(f"{stats_name} was computed from other data: classes {differ[:10]} have "
                          f"{stats.counts[differ[:10]].tolist()} samples there but {counts[differ[:10]].tolist()} "
                          "real images here (fine for statistics of a larger set than the images given; "
                          "otherwise a wrong result)", StatsMismatchWarning, stacklevel=2)

    n_syn = num_classes * ipc
    init_images = None
    if given_init is not None:
        if given_init.shape[0] != n_syn or tuple(given_init.shape[-2:]) != tuple(image_size):
            raise ValueError(f"init given as images must have shape [{n_syn}, 3, {image_size[0]}, {image_size[1]}] "
                             f"(C*ipc images at the real size, class-major), got {tuple(given_init.shape)}")
        init_images = given_init.detach().float()
    elif init == "real":
        init_images = survey.samples
    elif init == "centroid":
        init_images = _nearest_to_means(images, labels, encoder, stats.means, ipc, batch_size, dev, progress)
    synth = make_images(parameterization, n_syn, image_size, init_images=init_images, generator=dev_gen,
                        device=dev, extend_every=extend_every).to(dev)
    syn_labels = torch.arange(num_classes, device=dev).repeat_interleave(ipc)
    syn_labels_k = syn_labels.repeat(copies)

    augmenter = Augment(crop_size=crop_size, flip_prob=flip_prob, crop_scale=crop_scale,
                        crop_log_ratio=crop_log_ratio, noise_prob=noise_prob, noise_mean=noise_mean,
                        noise_std=noise_std) if augment else Augment.identity(crop_size)

    if method == "sfm":
        loss_module = FlowMatchingLoss(stats, nontarget_denominator=nontarget_denominator).to(dev)
    elif method == "clp":
        loss_module = ClosedFormProbeLoss(stats, lam=lam, tau=tau, real_batch=real_batch,
                                          relative_lam=relative_lam, centered_targets=centered_targets,
                                          feature_norm=feature_norm, bias=probe_bias, generator=cpu_gen)
    else:
        loss_module = LinearGradientMatchingLoss(num_classes=num_classes, head_std=head_std, generator=dev_gen)
        real_batches = _RealBatches(lgm_source, survey.labels, labels, num_classes)


    optimizer = torch.optim.Adam(synth.parameters(), lr=lr)
    history: List[float] = []
    start = 0
    if resumed is not None:
        synth = images_from_state(resumed["images"], dev)
        optimizer = torch.optim.Adam(synth.parameters(), lr=lr)
        optimizer.load_state_dict(resumed["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict restores the saved lr; lr, like steps, may change
            group["lr"] = lr
        history = list(resumed["history"])
        start = int(resumed["step"])
        cpu_gen.set_state(resumed["cpu_rng"])
        dev_gen.set_state(resumed["device_rng"].to(dev_gen.get_state().device))

    # ---- the loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    pending: List[torch.Tensor] = []
    bar = tqdm(total=steps, initial=min(start, steps), desc=f"distill {method}", unit="step",
               disable=not progress)
    try:
        for step in range(start, steps):
            if synth.maybe_extend(step, dev_gen):
                optimizer = torch.optim.Adam(synth.parameters(), lr=lr)  # LGM: Adam restarts on extension
            optimizer.zero_grad(set_to_none=True)
            s = synth()                                                       # 1. decode
            params = augmenter.sample(n_syn * copies, image_size, dev_gen, dev)
            if method == "lgm":
                with torch.no_grad():
                    xr, yr = real_batches.sample(ipc * copies, cpu_gen)
                    xr, yr = xr.to(dev), yr.to(dev)
                    real_params = augmenter.sample(xr.shape[0], xr.shape[-2:], dev_gen, dev)
                    step_rows = chunk_size or xr.shape[0]  # chunked too: memory flat in ipc*K*C
                    zr = torch.cat([_encode_rows(encoder, augmenter, xr, real_params, lo,
                                                 min(lo + step_rows, xr.shape[0]), autocast_dtype)
                                    for lo in range(0, xr.shape[0], step_rows)])
                real_side = (zr, yr)
            else:
                real_side = ()

            def loss_fn(zs, real_side=real_side, step=step):
                try:
                    return loss_module(zs, syn_labels_k, *real_side)
                except ValueError as e:  # the loss's own NaN/Inf check: blame the encoder, at this step
                    _raise_if_not_finite(e, step, zs, *real_side[:1])
                    raise
            if chunk_size is None:                                            # 2. loss, 3. backward
                loss = _plain_backward(encoder, augmenter, s, params, loss_fn, autocast_dtype)
            else:
                loss = _chunked_backward(encoder, augmenter, s, params, loss_fn, chunk_size, autocast_dtype)
            optimizer.step()
            pending.append(loss)
            if callback is not None:
                callback(step, loss)
            bar.update(1)
            done = step + 1
            save = checkpoint is not None and (done % checkpoint_every == 0 or done == steps)
            if len(pending) >= 10 or done == steps or save:  # one host sync per 10 steps, not per step
                _flush_losses(pending, history, method, done)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
            if save:  # never reached with a non-finite loss: _flush_losses raised
                _save_checkpoint(checkpoint, done, synth, optimizer, history, cpu_gen, dev_gen, settings)
    finally:
        bar.close()

    with torch.no_grad():
        final = synth().detach().clamp(0, 1).cpu()
    settings["seconds"] = time.perf_counter() - t_start
    return DistilledSet(final.float(), syn_labels.cpu(), method, settings, history)
