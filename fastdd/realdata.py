"""The real side of ``distill``: one streamed pass over the real data, and the real batches LGM draws.

``scan`` reads the source once, batch by batch (``fastdd.data.iterate_batches``): it validates it and
gathers the labels, the per-class counts, the image size and the data's fingerprints
(``DataFingerprints``: what a resumed run checks the data against), keeps a uniform random sample of ``k``
real images per class (the "real" initialisation; a reservoir with random keys from the run's CPU generator)
and, when an encoder is given, folds the features into the class statistics and the feature bank
(``fastdd.stats.StatsAccumulator``) in the same pass. ``nearest_to_means`` gives the "centroid"
initialisation: the real images nearest each class mean, read off the bank when one covers these images,
else by one more encoder pass (the means must be known first). ``RealBatches`` draws LGM's fresh
class-balanced batches by index. ``check_informative`` refuses an encoder whose features carry no signal
(all near zero, or the same for every image).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .data import iterate_batches
from .distributed import SINGLE, Group, shard_batches, shard_bounds
from .logs import Phase
from .stats import RealStats, StatsAccumulator, check_bank_file_source, source_length

__all__ = ["RealScan", "DataFingerprints", "scan", "nearest_to_means", "RealBatch", "RealBatches", "indexable",
           "check_informative", "NEAR_ZERO", "CONSTANT_RTOL", "FINGERPRINT_FIRST", "FINGERPRINT_STRIDE"]

NEAR_ZERO = 1e-6      # features whose largest |value| is below this carry no signal (an fp16 bank loses them)
CONSTANT_RTOL = 1e-5  # features that differ by at most this fraction of their size are the same features
FINGERPRINT_FIRST, FINGERPRINT_STRIDE = 64, 1024  # the images the data's fingerprint reads: the first 64 rows and
# every 1024th (1,314 of ImageNet-1k's 1.28 M: a changed small set or a changed large one shows, at a hash's cost)


class DataFingerprints:
    """What a checkpoint remembers of the real data, beside its class counts and image size:
    ``labels``, a hash of every label in the source's order, and ``images``, a hash of the images at the
    rows ``FINGERPRINT_FIRST`` and ``FINGERPRINT_STRIDE`` pick (their float32 values), so that a run
    resumed on other images or other labels with the same counts is refused. Both depend on the order:
    a shuffled DataLoader, or random transforms in the data pipeline, make other fingerprints each pass.
    Under a group each rank hashes the rows it reads; ``result`` combines them in row order, so the
    fingerprints do not depend on the number of processes or the batch size."""

    def __init__(self):
        self.rows: List[Tuple[int, bytes]] = []

    def add(self, images: torch.Tensor, offset: int) -> None:
        """Hash the picked rows of one batch, whose first row is the source's ``offset``."""
        end = offset + images.shape[0]
        strided = -(-offset // FINGERPRINT_STRIDE) * FINGERPRINT_STRIDE  # the first multiple at or after offset
        picked = set(range(offset, min(end, FINGERPRINT_FIRST))) | set(range(strided, end, FINGERPRINT_STRIDE))
        for row in sorted(picked):
            values = images[row - offset].detach().to("cpu", torch.float32).contiguous()
            self.rows.append((row, hashlib.blake2b(values.numpy().tobytes(), digest_size=16).digest()))

    def result(self, labels: torch.Tensor, group: Group) -> Dict[str, str]:
        """``{"real_labels_fingerprint": ..., "real_images_fingerprint": ...}`` (hex) of the whole data."""
        rows = self.rows
        if group.distributed:
            rows = [pair for part in group.all_gather_object(rows, what="the data's fingerprints") for pair in part]
        images = hashlib.blake2b(digest_size=16)
        for row, digest in sorted(rows):
            images.update(row.to_bytes(8, "little") + digest)
        label_bytes = labels.to("cpu", torch.int64).contiguous().numpy().tobytes()
        return {"real_labels_fingerprint": hashlib.blake2b(label_bytes, digest_size=16).hexdigest(),
                "real_images_fingerprint": images.hexdigest()}


class _SmallestPerClass:
    """Keep, per class, the ``k`` items with the smallest keys seen so far (streaming).

    Random keys give a uniform sample without replacement per class; distances to the class mean give
    the ``k`` nearest real images (the "centroid" initialisation)."""

    def __init__(self, k: int, num_classes: int):
        self.k, self.num_classes = k, num_classes
        self.keys = torch.full((num_classes, k), math.inf, dtype=torch.float64)
        self.items: Optional[torch.Tensor] = None

    def update(self, keys: torch.Tensor, labels: torch.Tensor, items: torch.Tensor) -> None:
        keys, labels, items = keys.double().cpu(), labels.cpu(), items.detach().cpu()
        grow = int(labels.max()) + 1 - self.num_classes  # classes revealed by a stream: add empty slots
        if grow > 0:
            self.num_classes += grow
            self.keys = torch.cat([self.keys, torch.full((grow, self.k), math.inf, dtype=torch.float64)])
            if self.items is not None:
                self.items = torch.cat([self.items, self.items.new_zeros(grow, *self.items.shape[1:])])
        if self.items is None:
            self.items = torch.zeros(self.num_classes, self.k, *items.shape[1:], dtype=items.dtype)
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

    def merged(self, group: Group, num_classes: int, item_shape: Tuple[int, ...]) -> torch.Tensor:
        """``result()`` over the items of every rank: the ``k`` smallest keys per class of all ranks (each
        class must have ``k`` items in all). The ranks' keys are gathered; each rank then sends the items it
        holds of the winners, so every rank receives ``C*k`` items, as one process keeps."""
        if not group.distributed:
            return self.result()
        keys = torch.full((num_classes, self.k), math.inf, dtype=torch.float64)
        keys[:self.num_classes] = self.keys
        every = torch.stack(group.all_gather_object(keys, what="the real initialisation's keys"))  # [W, C, k]
        best = torch.argsort(every.permute(1, 0, 2).reshape(num_classes, -1), dim=1)[:, :self.k]  # [C, k]
        holder, slot = best // self.k, best % self.k
        counts = [int((holder == r).sum()) for r in range(group.world_size)]
        classes, places = (holder == group.rank).nonzero(as_tuple=True)
        sent = self.items[classes, slot[classes, places]] if counts[group.rank] else torch.zeros(0, *item_shape)
        received = group.all_gather_rows(sent, counts, what="the real initialisation's images")
        out = received.new_zeros(num_classes, self.k, *item_shape)
        start = 0
        for r in range(group.world_size):  # rank r sent its winners in row-major (class, rank of key) order
            out[(holder == r).nonzero(as_tuple=True)] = received[start:start + counts[r]]
            start += counts[r]
        return out.reshape(num_classes * self.k, *item_shape)


@dataclass
class RealScan:
    labels: torch.Tensor             # int64 [N] in the source's order
    counts: torch.Tensor             # int64 [C]
    image_size: Tuple[int, int]
    samples: Optional[torch.Tensor]  # [C*k, 3, H, W] random real images per class, or None
    stats: Optional[RealStats]       # the class statistics (and bank), when an encoder was given
    seconds: float = 0.0             # the pass's wall time
    fingerprints: Dict[str, str] = field(default_factory=dict)  # DataFingerprints.result


def scan(source, labels, *, num_classes: Optional[int], batch_size: int, sample_per_class: int,
         generator: torch.Generator, encoder=None, bank: bool = False, bank_dtype=torch.float16,
         bank_path=None, device=None, progress: bool = True, fingerprint: Optional[str] = None,
         group: Group = SINGLE) -> RealScan:
    """One pass over the real data (see the module docstring). ``encoder`` None: no statistics; the
    statistics record ``fingerprint`` (``fastdd.encoders.fingerprint`` of ``encoder``). Under a ``group``
    each rank reads its own batches (``fastdd.distributed.shard_batches``) and every rank returns the
    scan of the whole data, the one a single process makes."""
    if encoder is not None:
        check_bank_file_source(group, bank_path, source)
    accumulator = None if encoder is None else StatsAccumulator(
        num_classes, bank=bank, bank_dtype=bank_dtype, bank_path=bank_path, group=group,
        rows=None if group.distributed else source_length(source))
    label_chunks, rows, size, reservoir, fingerprints = [], [], None, None, DataFingerprints()
    phase = Phase("real data" if encoder is None else "real data and statistics", progress=progress and group.is_main,
                  log=group.is_main)
    failure = None
    try:
        for batch in shard_batches(source, labels, batch_size, group):
            # the keys of every batch are drawn, this rank's or not: the generator moves as in one process
            keys = torch.rand(batch.size, generator=generator, dtype=torch.float64) if sample_per_class else None
            phase.update(batch.size)
            if batch.data is None:
                continue
            images, ys = batch.data
            if size is None:
                size = tuple(images.shape[-2:])
            elif tuple(images.shape[-2:]) != size:
                raise ValueError(f"images: all real images must have one size; batch {batch.index} has "
                                 f"{tuple(images.shape[-2:])}, earlier ones {size}")
            if num_classes is not None and int(ys.max()) >= num_classes:
                raise ValueError(f"labels must lie in [0, num_classes={num_classes}), found {int(ys.max())}")
            label_chunks.append(ys)
            rows.append(torch.arange(batch.offset, batch.offset + batch.size))
            fingerprints.add(images, batch.offset)
            if sample_per_class:
                if reservoir is None:
                    reservoir = _SmallestPerClass(sample_per_class, num_classes or 1)
                reservoir.update(keys, ys, images)
            if accumulator is not None:
                accumulator.encode_and_add(encoder, images, ys, device, batch.offset)
    except Exception as e:  # noqa: BLE001 - raised below, on every rank
        failure = e
    finally:
        if failure is not None:
            phase.close()
        if accumulator is not None:
            accumulator.close()
    group.raise_first_failure(failure, "reading the real data")
    all_labels, size = _whole(group, label_chunks, rows, size)
    c = num_classes if num_classes is not None else int(all_labels.max()) + 1
    counts = torch.bincount(all_labels, minlength=c)
    samples = None
    if sample_per_class and not bool((counts < sample_per_class).any()):  # else check_classes reports it
        if reservoir is None:  # a rank that read no batch
            reservoir = _SmallestPerClass(sample_per_class, c)
        samples = reservoir.merged(group, c, (3, *size))
    stats = None if accumulator is None else accumulator.result(getattr(encoder, "name", None))
    if stats is not None:
        stats.encoder_fingerprint = fingerprint
    bank_rows = 0 if stats is None or not stats.has_bank else stats.bank_features.shape[0]
    phase.done(f"{all_labels.shape[0]} images of {c} classes at {size[0]}x{size[1]}" +
               ("" if stats is None else f", class statistics of {stats.feature_dim}-d features") +
               (f" and a {bank_rows}-row bank" if bank_rows else ""), images=int(all_labels.shape[0]), classes=c)
    return RealScan(all_labels, counts, size, samples, stats, phase.seconds, fingerprints.result(all_labels, group))


def _whole(group: Group, label_chunks, rows, size) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Every rank's labels in the global row order, and the image size all ranks saw."""
    labels = torch.cat(label_chunks) if label_chunks else torch.zeros(0, dtype=torch.int64)
    if not group.distributed:
        return labels, size
    sizes = [s for s in group.all_gather_object(size, what="the image sizes") if s is not None]
    if any(s != sizes[0] for s in sizes):
        raise ValueError(f"images: all real images must have one size; the ranks read sizes {sorted(set(sizes))}")
    order = group.all_gather_rows(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64),
                                  what="the real rows' positions")
    if order.numel() == 0 or not bool((torch.bincount(order, minlength=order.shape[0]) == 1).all()):
        raise ValueError("images: the ranks read overlapping or missing rows of the real data; every rank must "
                         "be given the same whole data (not a per-rank share) and the same batch_size")
    out = torch.empty(order.shape[0], dtype=torch.int64)
    out[order] = group.all_gather_rows(labels.cpu(), what="the real labels")
    return out, sizes[0]


def check_classes(counts: torch.Tensor, ipc: int, name: str = "labels") -> None:
    """Every class has at least ``ipc`` real images (and at least two classes exist)."""
    if counts.shape[0] < 2:
        raise ValueError(f"{name}: distillation needs at least 2 classes, found {counts.shape[0]}")
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"{name}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no real image "
                         f"(empty classes); relabel to 0..C-1 or pass the right num_classes")
    smallest = int(counts.min())
    if ipc > smallest:
        c = int(torch.argmin(counts))
        raise ValueError(f"ipc={ipc} is larger than class {c}, which has only {smallest} real images")


def check_informative(features: torch.Tensor, what: str, encoder_name: str) -> None:
    """Refuse an encoder whose ``features`` (``[n >= 2, D]`` of real images, or their class means) are all
    near zero or all the same: distillation would run without progress (CLP's loss stays at log C, LGM's
    at 0, whatever the images). Non-finite features are left to the checks that name them."""
    z = features.detach().double()
    if z.shape[0] < 2 or not bool(torch.isfinite(z).all()):
        return
    scale = float(z.abs().max())
    if scale < NEAR_ZERO:
        raise ValueError(f"encoder {encoder_name}: {what} are all near zero (largest |value| {scale:.3g} < "
                         f"{NEAR_ZERO:g}), so distillation has nothing to match: check the encoder (its weights "
                         "and its output layer), or scale its features up")
    spread = float((z - z.mean(0)).abs().max())
    if spread <= CONSTANT_RTOL * scale:
        raise ValueError(f"encoder {encoder_name}: {what} are the same for every image (largest difference "
                         f"{spread:.3g} at a size of {scale:.3g}): a constant encoder gives distillation nothing "
                         "to follow; check the encoder (its weights and its output layer)")


def nearest_to_means(source, labels, scanned_labels: torch.Tensor, encoder, stats: RealStats, k: int,
                     batch_size: int, device, progress: bool) -> torch.Tensor:
    """The ``k`` real images nearest (Euclidean, in feature space) to each class mean, class-major.

    With a feature bank of exactly these images (its labels are the scanned ones, row for row) the
    distances come from the bank and only the chosen images are read again; otherwise the encoder runs
    over the source once more."""

    means = stats.means
    if stats.has_bank and torch.equal(stats.bank_labels, scanned_labels):
        keep = _SmallestPerClass(k, means.shape[0])
        for lo in range(0, stats.bank_features.shape[0], 65536):
            z = stats.bank_features[lo:lo + 65536].float()
            ys = stats.bank_labels[lo:lo + 65536]
            keep.update((z - means[ys]).pow(2).sum(1), ys, torch.arange(lo, lo + ys.shape[0]))
        return _images_at(source, labels, keep.result(), batch_size)
    keep = _SmallestPerClass(k, means.shape[0])
    means = means.to(device)
    phase = Phase("finding class centroids", progress=progress)
    try:
        for images, ys in iterate_batches(source, labels, batch_size=batch_size):
            with torch.no_grad():
                z = encoder(images.to(device))
            keep.update((z - means[ys.to(device)]).pow(2).sum(1), ys, images)
            phase.update(ys.shape[0])
    except BaseException:
        phase.close()
        raise
    phase.done(f"the {k} real images nearest each of {means.shape[0]} class means")
    return keep.result()


def _images_at(source, labels, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The images at stream positions ``rows`` (in that order), read by one pass without the encoder."""
    if isinstance(source, torch.Tensor):
        return next(iter(iterate_batches(source[rows], torch.as_tensor(labels)[rows], batch_size=rows.shape[0])))[0]
    out, seen = None, 0
    for images, _ in iterate_batches(source, labels, batch_size=batch_size):
        n = images.shape[0]
        slots = [slot for slot, r in enumerate(rows.tolist()) if seen <= r < seen + n]
        if slots:
            out = images.new_zeros(rows.shape[0], *images.shape[1:]) if out is None else out
            out[slots] = images[rows[slots] - seen]
        seen += n
    return out


def indexable(source):
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


class RealBatch(NamedTuple):
    """A real batch of one step: this rank's ``images`` and ``labels``, rows ``first..first+len-1`` of
    the step's ``total`` rows (one process: all of them)."""

    images: torch.Tensor
    labels: torch.Tensor
    total: int
    first: int


class RealBatches:
    """Class-balanced random real batches, drawn by index from a tensor or a map-style dataset (LGM).
    Under a group every rank draws the same indices (the same generator) and reads only its share."""

    def __init__(self, source, labels_all: torch.Tensor, labels_tensor, num_classes: int, group: Group = SINGLE):
        self.source = source
        self.labels_tensor = labels_tensor
        self.group = group
        order = torch.argsort(labels_all, stable=True)
        counts = torch.bincount(labels_all, minlength=num_classes)
        self.by_class = list(torch.split(order, counts.tolist()))

    def __call__(self, per_class: int, generator: torch.Generator) -> RealBatch:
        picks = []
        for idx in self.by_class:
            if per_class <= idx.numel():  # without replacement when the class is large enough
                picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
            else:
                picks.append(idx[torch.randint(idx.numel(), (per_class,), generator=generator)])
        idx = torch.cat(picks)
        lo, hi = shard_bounds(idx.numel(), self.group.rank, self.group.world_size)
        if hi == lo:
            raise ValueError(f"a real batch of {idx.numel()} images cannot be shared by {self.group.world_size} "
                             "ranks: use fewer processes or a larger real batch (ipc, copies)")
        mine = idx[lo:hi]
        if isinstance(self.source, torch.Tensor):
            batch = iterate_batches(self.source[mine], torch.as_tensor(self.labels_tensor)[mine],
                                    batch_size=mine.numel())
        else:
            batch = iterate_batches(torch.utils.data.Subset(self.source, mine.tolist()), batch_size=mine.numel())
        images, labels = next(iter(batch))
        return RealBatch(images, labels, idx.numel(), lo)
