"""Statistics of the real data that the distillation losses need, computed in one streamed pass.

``RealStats`` holds, for C classes and D-dimensional features of a frozen encoder:

- ``counts`` int64 ``[C]`` and ``sums`` float64 ``[C, D]`` (``means`` float32 is ``sums / counts``),
- optionally ``sq_sums`` float64 ``[C, D]`` (per-class sums of squared features, for second moments),
- optionally a feature bank ``bank_features [N, D]`` (a chosen dtype; in memory or memory-mapped on disk)
  with ``bank_labels`` int64 ``[N]``.

SFM needs only the class means, CLP only the bank: neither touches a real image while distilling.

Accumulation policy: each batch is reduced by ``fastdd.ops.class_centers`` (fp32 sums of one batch), and
the batch sums are added into fp64 totals, so the error does not grow with the number of batches; the
encoder runs un-augmented (its wrapper resizes and centre-crops), without a graph.

Files: ``save``/``load`` use fastdd's checked, versioned container (``fastdd.files``): a safetensors file
by default (readable by any safetensors client; the torch zip files of earlier versions still load), a
truncated or altered file raises ``CorruptFileError`` naming the file, and writes are atomic.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ops
from .encoders import encoder_device, fingerprint, resolve_encoder
from .files import CorruptFileError, load_checked, save_checked
from .logs import Phase
from .distributed import SINGLE, Group
from .validate import class_labels, positive_int, shown, tensor_range

__all__ = ["RealStats", "StatsAccumulator", "CorruptFileError", "source_length"]

STATS_FORMAT = "fastdd.RealStats"
STATS_FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# RealStats
# --------------------------------------------------------------------------------------------------

_BANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RealStats:
    """Per-class counts, fp64 feature sums (and optional second moments and feature bank) of a real set.

    Build with ``RealStats.from_data`` (one streamed encoder pass) or ``RealStats.from_features`` (for
    codebases that already have features); ``save``/``load`` keep them on disk.

    Attributes:
        counts: int64 ``[C]``. sums: float64 ``[C, D]``. sq_sums: float64 ``[C, D]`` or None.
        bank_features: ``[N, D]`` (bank dtype; may be memory-mapped) or None. bank_labels: int64 ``[N]``.
        encoder_name: the encoder's name when known (informational).
        encoder_fingerprint: ``fastdd.encoders.fingerprint`` of the encoder's weights when known (set by
            ``from_data`` and by distill's pass; None for ``from_features`` and files of earlier fastdd):
            distill refuses statistics of another encoder.
        image_size: ``(H, W)`` of the real images encoded, when known and one size (set by ``from_data``
            and by distill's pass; None for ``from_features``, for images of several sizes and for files of
            earlier fastdd): distill refuses statistics of images of another size, since the features of
            one image at two sizes differ even when the encoder resizes its input.
    """

    def __init__(self, counts: torch.Tensor, sums: torch.Tensor, sq_sums: Optional[torch.Tensor] = None,
                 bank_features: Optional[torch.Tensor] = None, bank_labels: Optional[torch.Tensor] = None,
                 encoder_name: Optional[str] = None, encoder_fingerprint: Optional[str] = None,
                 image_size: Optional[Sequence[int]] = None):
        counts = torch.as_tensor(counts)
        sums = torch.as_tensor(sums)
        if counts.dim() != 1 or counts.dtype != torch.int64:
            raise ValueError(f"counts must be int64 [C], got {counts.dtype} {tuple(counts.shape)}")
        if sums.dim() != 2 or sums.shape[0] != counts.shape[0]:
            raise ValueError(f"sums must have shape [C={counts.shape[0]}, D], got {tuple(sums.shape)}")
        if bool((counts < 0).any()):
            raise ValueError("counts must be >= 0")
        if sq_sums is not None and tuple(sq_sums.shape) != tuple(sums.shape):
            raise ValueError(f"sq_sums must have shape {tuple(sums.shape)}, got {tuple(sq_sums.shape)}")
        if (bank_features is None) != (bank_labels is None):
            raise ValueError("bank_features and bank_labels must be given together")
        if bank_features is not None:
            if bank_features.dim() != 2 or bank_features.shape[1] != sums.shape[1]:
                raise ValueError(f"bank_features must have shape [N, D={sums.shape[1]}], "
                                 f"got {tuple(bank_features.shape)}")
            if bank_labels.dim() != 1 or bank_labels.shape[0] != bank_features.shape[0]:
                raise ValueError(f"bank_labels must have shape [{bank_features.shape[0]}], "
                                 f"got {tuple(bank_labels.shape)}")
            if bank_labels.numel() and (int(bank_labels.min()) < 0 or int(bank_labels.max()) >= counts.shape[0]):
                raise ValueError(f"bank_labels must lie in [0, C={counts.shape[0]}), found "
                                 f"[{int(bank_labels.min())}, {int(bank_labels.max())}]")
        if not bool(torch.isfinite(sums).all()) or (sq_sums is not None and not bool(torch.isfinite(sq_sums).all())):
            raise ValueError("sums and sq_sums must be finite (NaN or Inf found)")
        if image_size is not None:
            if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
                raise ValueError(f"image_size must be None or (H, W), two positive ints, got {shown(image_size)}")
            image_size = (int(image_size[0]), int(image_size[1]))
        self.counts = counts.cpu()
        self.sums = sums.to("cpu", torch.float64)
        self.sq_sums = None if sq_sums is None else sq_sums.to("cpu", torch.float64)
        self.bank_features = bank_features
        self.bank_labels = None if bank_labels is None else bank_labels.to("cpu", torch.int64)
        self.encoder_name = encoder_name
        self.encoder_fingerprint = encoder_fingerprint
        self.image_size = image_size

    # ---- derived values ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.sums.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def empty_classes(self) -> list:
        """Indices of classes with no sample (their mean is reported as zero)."""
        return [int(c) for c in torch.nonzero(self.counts == 0).flatten()]

    @property
    def means(self) -> torch.Tensor:
        """Class means, float32 ``[C, D]`` (zero rows for empty classes; see ``empty_classes``)."""
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1).double()).float()

    @property
    def second_moments(self) -> torch.Tensor:
        """Per-class ``E[z^2]``, float32 ``[C, D]``; needs ``second_moment=True`` at construction."""
        if self.sq_sums is None:
            raise ValueError("these statistics were computed without second_moment=True")
        return (self.sq_sums / self.counts.clamp(min=1).unsqueeze(1).double()).float()

    @property
    def has_bank(self) -> bool:
        return self.bank_features is not None

    def require_nonempty(self, what: str = "these statistics") -> None:
        """Raise a ValueError naming the empty classes, if any."""
        empty = self.empty_classes
        if empty:
            raise ValueError(f"{what}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no real "
                             "sample (empty classes); pass num_classes matching the labels present")

    def __repr__(self) -> str:
        bank = "none" if self.bank_features is None else \
            f"{tuple(self.bank_features.shape)} {self.bank_features.dtype}"
        return (f"RealStats(classes={self.num_classes}, dim={self.feature_dim}, samples={self.num_samples}, "
                f"second_moment={self.sq_sums is not None}, bank={bank})")

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_data(cls, source, encoder, labels=None, num_classes: Optional[int] = None, bank: bool = False,
                  bank_dtype: torch.dtype = torch.float16, bank_path: Optional[Union[str, os.PathLike]] = None,
                  second_moment: bool = False, batch_size: int = 256, device=None,
                  progress: bool = True, encoder_kwargs: Optional[dict] = None, group=None) -> "RealStats":
        """One streamed pass of ``encoder`` over ``source``.

        Args:
            source: a tensor ``[N,3,H,W]`` in [0,1] (with ``labels``), a ``fastdd.data.Split``, a map-style
                Dataset yielding ``(image, label)`` or a DataLoader yielding ``(images, labels)``; read batch
                by batch via ``fastdd.data.iterate_batches`` (the whole set is never in memory).
            encoder: a ``FrozenEncoder``, any nn.Module (wrapped by ``fastdd.encoders.wrap``) or a name for
                ``fastdd.encoders.load`` with ``encoder_kwargs`` (its ``weights``, ``input_size``).
            num_classes: C; inferred (max label + 1) when None. Classes absent from the data keep count 0.
            bank: also keep every feature (for CLP), in ``bank_dtype``.
            bank_path: write the bank to this raw file and memory-map it (for banks larger than memory);
                implies ``bank=True``. The file holds ``N*D`` values of ``bank_dtype``, row-major.
            second_moment: also accumulate per-class sums of squared features.
            batch_size: images per encoder call. device: where the encoder runs (default: its own device).
            progress: show a tqdm progress bar (on rank 0).
            group: the ``torch.distributed`` process group to share the pass with (default: the default
                group when one is initialised, e.g. under ``torchrun``): each rank encodes its own run of
                batches, the sums are all-reduced and every rank returns the same statistics, equal to one
                process's (``fastdd.distributed``). With ``bank_path`` the ranks must share a file system.
        """
        from .data import Split, num_classes_of
        from .distributed import resolve_group, shard_batches

        if isinstance(source, Split):
            if labels is not None:
                raise ValueError("labels= is not used with a fastdd.data.Split: it holds its own labels")
            source, labels = source.images, source.labels
        if num_classes is None and isinstance(source, torch.Tensor) and labels is not None:
            num_classes = num_classes_of(class_labels("labels", labels))  # strings: a clear TypeError
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {_BANK_DTYPES}, got {bank_dtype}")
        group = resolve_group(group)
        check_bank_file_source(group, bank_path, source)
        encoder = resolve_encoder(encoder, device, encoder_kwargs)
        dev = encoder_device(encoder) if device is None else torch.device(device)
        rows = source_length(source)
        accumulator = StatsAccumulator(num_classes, bank=bank, bank_dtype=bank_dtype, bank_path=bank_path,
                                       second_moment=second_moment, rows=None if group.distributed else rows,
                                       group=group)
        phase = Phase("real statistics", total=rows, progress=progress and group.is_main, log=group.is_main)
        failure = None
        try:
            for batch in shard_batches(source, labels, batch_size, group):
                if batch.data is not None:
                    accumulator.encode_and_add(encoder, *batch.data, dev, batch.offset)
                phase.update(batch.size)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            failure = e
        finally:
            if failure is not None:
                phase.close()
            accumulator.close()
        group.raise_first_failure(failure, "the statistics pass")
        stats = accumulator.result(getattr(encoder, "name", None))
        stats.encoder_fingerprint = fingerprint(encoder)
        phase.done(f"{stats.num_samples} images of {stats.num_classes} classes, {stats.feature_dim}-d features"
                   + (f", a {stats.bank_features.shape[0]}-row bank" if stats.has_bank else ""),
                   images=stats.num_samples, classes=stats.num_classes)
        return stats

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                      bank: bool = True, second_moment: bool = False,
                      chunk_size: int = 65536) -> "RealStats":
        """Statistics from features already computed (``[N, D]``, any float dtype, possibly memory-mapped).

        With ``bank=True`` the bank *is* ``features`` (no copy; keep it alive and unmodified) and
        ``labels`` (as int64). Sums are reduced chunk by chunk (``chunk_size`` rows) into fp64.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError("features must be a floating tensor [N, D], got "
                             f"{getattr(features, 'dtype', type(features).__name__)} "
                             f"{tuple(getattr(features, 'shape', ()))}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must have shape [{features.shape[0]}], got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if features.shape[0] == 0:
            raise ValueError("features is empty")
        chunk_size = positive_int("chunk_size", chunk_size)
        labels = labels.long()
        lo, hi = int(labels.min()), int(labels.max())
        num_classes = hi + 1 if num_classes is None else positive_int("num_classes", num_classes)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}), found [{lo}, {hi}]")
        sums = sq_sums = counts = None
        for start in range(0, features.shape[0], chunk_size):
            f = features[start:start + chunk_size]
            y = labels[start:start + chunk_size].to(f.device)
            if not bool(torch.isfinite(f).all()):
                raise ValueError(f"features contain NaN or Inf (rows {start}..{start + f.shape[0] - 1})")
            part = ops.class_centers(f.float() if f.dtype == torch.float64 else f, y, num_classes,
                                     second_moment=second_moment)
            sums, counts, sq_sums = _grow_add(sums, counts, sq_sums, part, num_classes, features.shape[1])
        return cls(counts, sums, sq_sums, features if bank else None, labels if bank else None)

    # ---- files -------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], include_bank: bool = True,
             container: str = "safetensors") -> None:
        """Save to ``path`` (format version, checksum, atomic write) as a safetensors file (the tensors by
        their names, ``counts``, ``sums``, ``sq_sums``, ``bank_features``, ``bank_labels``; the encoder's
        name and fingerprint and the image size as JSON in its metadata), or with ``container="torch"`` as
        the torch zip file of earlier fastdd versions (see ``fastdd.files``). The bank is written from its own memory, a
        chunk at a time (a memory-mapped bank is read page by page, not copied whole)."""
        payload = {"counts": self.counts, "sums": self.sums, "sq_sums": self.sq_sums,
                   "bank_features": self.bank_features if include_bank else None,
                   "bank_labels": self.bank_labels if include_bank else None,
                   "encoder_name": self.encoder_name, "encoder_fingerprint": self.encoder_fingerprint,
                   "image_size": None if self.image_size is None else list(self.image_size)}
        save_checked(payload, path, STATS_FORMAT, STATS_FORMAT_VERSION, container=container)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], mmap: bool = True, verify: bool = True,
             shard: Optional[tuple] = None) -> "RealStats":
        """Load statistics saved by ``save`` (either container, told by its first bytes); the bank is
        memory-mapped from the file when ``mmap`` (its pages are read on first use).

        ``shard=(index, count)``: keep only the bank rows of shard ``index`` of ``count`` (the contiguous
        run ``fastdd.distributed.shard_bounds`` gives, e.g. ``(rank, world_size)``); the class counts and
        sums stay those of the whole set.

        Raises ``CorruptFileError`` for a truncated, altered or foreign file.
        """
        if shard is not None:
            if not isinstance(shard, (tuple, list)) or len(shard) != 2:
                raise ValueError(f"shard must be a pair (index, count), got {shown(shard)}")
            index = positive_int("shard index", shard[0], minimum=0)
            count = positive_int("shard count", shard[1])
            if index >= count:
                raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shown(shard)}")
        p = load_checked(path, STATS_FORMAT, STATS_FORMAT_VERSION, mmap=mmap, verify=verify)
        bank, bank_labels = p.get("bank_features"), p.get("bank_labels")
        if shard is not None and bank is not None:
            from .distributed import shard_bounds

            lo, hi = shard_bounds(bank.shape[0], index, count)
            bank, bank_labels = bank[lo:hi], bank_labels[lo:hi]
        try:
            return cls(p["counts"], p["sums"], p.get("sq_sums"), bank, bank_labels,
                       p.get("encoder_name"), p.get("encoder_fingerprint"), p.get("image_size"))
        except (KeyError, ValueError) as e:
            raise CorruptFileError(f"{path} holds inconsistent statistics: {e}") from e


class StatsAccumulator:
    """The statistics of a stream of feature batches: per-class fp64 sums and counts (and squared sums),
    and optionally the feature bank (in memory, or written to ``bank_path`` and memory-mapped).

    ``add(features, labels, batch_rows)`` per batch, ``close()`` when the stream ends (also on error),
    then ``result()``. Used by ``RealStats.from_data`` and by ``distill``'s one pass over the real data.
    ``num_classes`` None: the class axis grows with the labels seen. ``rows``: the number of images of
    the stream when known (``source_length``): the bank is then written into one tensor of that size as the
    batches come, else kept batch by batch and merged with bounded memory (``_Rows``); either way it
    costs about its own size in memory, during the pass and after."""

    def __init__(self, num_classes: Optional[int] = None, bank: bool = False,
                 bank_dtype: torch.dtype = torch.float16, bank_path: Optional[Union[str, os.PathLike]] = None,
                 second_moment: bool = False, rows: Optional[int] = None, group: Group = SINGLE):
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {_BANK_DTYPES}, got {bank_dtype}")
        self.num_classes = None if num_classes is None else positive_int("num_classes", num_classes)
        self.bank = bank or bank_path is not None
        self.bank_dtype, self.bank_path, self.second_moment = bank_dtype, bank_path, second_moment
        self.sums = self.counts = self.sq_sums = None
        self.rows = 0
        expected = positive_int("rows", rows, allow_none=True, minimum=0)
        self._bank_rows = _Rows(expected, bank_dtype) if self.bank and bank_path is None else None
        self._label_rows = _Rows(expected, torch.int64)
        self.group = group
        self.positions = []  # under a group: the global rows of this rank's batches
        self.image_sizes = set()  # (H, W) of the images encode_and_add saw
        self._bank_file = open(self._part_path(group.rank), "wb") if bank_path is not None else None

    def _part_path(self, rank: int) -> str:
        """The file this rank writes its bank rows to: ``bank_path`` itself for one process."""
        return os.fspath(self.bank_path) if not self.group.distributed else f"{os.fspath(self.bank_path)}.part{rank}"

    def add(self, feats: torch.Tensor, labels: torch.Tensor, batch_rows: int, offset: Optional[int] = None) -> None:
        """Fold in one batch: the encoder's ``feats [B, D]`` of ``batch_rows`` images and their labels;
        under a group, ``offset`` is the batch's first row in the global stream."""
        rows = self.rows if offset is None else offset
        if self.group.distributed:
            self.positions.append(torch.arange(rows, rows + batch_rows))
        if feats.dim() != 2 or feats.shape[0] != batch_rows or not feats.is_floating_point():
            raise ValueError(f"encoder must return floating features [B, D]; got {feats.dtype} "
                             f"{tuple(feats.shape)} for {batch_rows} images")
        low, high = tensor_range(feats)  # NaN and Inf show in it, and whether the bank's dtype holds the values
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"encoder returned NaN or Inf features for real images {rows}..{rows + batch_rows - 1}")
        labels = labels.to(feats.device)
        hi = int(labels.max()) + 1
        if self.num_classes is not None and hi > self.num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), found {hi - 1}")
        c = self.num_classes if self.num_classes is not None else \
            max(hi, 0 if self.counts is None else self.counts.shape[0])
        part = ops.class_centers(feats, labels, c, second_moment=self.second_moment)
        self.sums, self.counts, self.sq_sums = _grow_add(self.sums, self.counts, self.sq_sums, part, c,
                                                         feats.shape[1])
        if self.bank:
            feats = feats.detach()
            if self._bank_rows is not None:  # written in place: no batch copy beside the bank
                chunk = self._bank_rows.append(feats)
            else:
                chunk = feats.to("cpu", self.bank_dtype)
            if max(-low, high) > torch.finfo(self.bank_dtype).max and not bool(torch.isfinite(chunk).all()):
                # finite features beyond fp16's range
                raise ValueError(f"encoder features of real images {rows}..{rows + batch_rows - 1} exceed the "
                                 f"range of bank_dtype={self.bank_dtype} (largest |value| "
                                 f"{max(-low, high):.4g}): pass bank_dtype=torch.float32")
            if self._bank_file is not None:
                self._bank_file.write(_raw_bytes(chunk))
            self._label_rows.append(labels)
        self.rows += batch_rows

    def encode_and_add(self, encoder, images: torch.Tensor, labels: torch.Tensor, device,
                       offset: Optional[int] = None) -> None:
        """Encode one batch of real images (no graph) on ``device`` and fold its features in."""
        with torch.no_grad():
            feats = encoder(images.to(device, non_blocking=True))
        self.add(feats, labels, images.shape[0], offset)
        self.image_sizes.add(tuple(images.shape[-2:]))

    def close(self) -> None:
        if self._bank_file is not None:
            self._bank_file.close()

    def result(self, encoder_name: Optional[str] = None) -> "RealStats":
        """The statistics of the stream; under a group, of every rank's stream (``_reduced``)."""
        if self.group.distributed:
            return self._reduced(encoder_name)
        bank_features = bank_labels = None
        if self.bank:
            bank_labels = self._label_rows.result(())
            if self.bank_path is not None:
                bank_features = _map_bank(self.bank_path, self.rows, self.sums.shape[1], self.bank_dtype)
            else:
                bank_features = self._bank_rows.result((self.sums.shape[1],))
        return RealStats(self.counts, self.sums, self.sq_sums, bank_features, bank_labels, encoder_name,
                         image_size=self._image_size(self.image_sizes))

    @staticmethod
    def _image_size(sizes) -> Optional[Tuple[int, int]]:
        """The one ``(H, W)`` of ``sizes``, or None (none seen, or several)."""
        return next(iter(sizes)) if len(sizes) == 1 else None


    def _reduced(self, encoder_name: Optional[str]) -> "RealStats":
        """Every rank's statistics as one process's: fp64 sums and counts all-reduced, the bank's rows
        and labels gathered into the global row order (in memory on every rank, or concatenated from the
        ranks' part files into ``bank_path`` by rank 0 and memory-mapped by all)."""
        g = self.group
        shapes = g.all_gather_object(None if self.sums is None else tuple(self.sums.shape), what="the class axes")
        known = [s for s in shapes if s is not None]
        if not known:
            raise ValueError("the real data yielded no image on any rank")
        c = self.num_classes if self.num_classes is not None else max(s[0] for s in known)
        dim = known[0][1]
        sums = torch.zeros(c, dim, dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.int64)
        sq_sums = torch.zeros(c, dim, dtype=torch.float64) if self.second_moment else None
        if self.sums is not None:
            k = self.sums.shape[0]
            sums[:k], counts[:k] = self.sums.cpu(), self.counts.cpu()
            if sq_sums is not None:
                sq_sums[:k] = self.sq_sums.cpu()
        sums, counts = g.all_reduce_sum(sums, "summing the class sums"), g.all_reduce_sum(counts, "summing counts")
        if sq_sums is not None:
            sq_sums = g.all_reduce_sum(sq_sums, "summing the squared sums")
        bank_features = bank_labels = None
        if self.bank:
            positions = torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.long)
            order = g.all_gather_rows(positions, what="the bank's row positions")
            labels = self._label_rows.result(())
            in_order = torch.equal(order, torch.arange(order.shape[0]))  # contiguous runs: no scatter needed
            bank_labels = _placed(g.all_gather_rows(labels, what="the bank's labels"), order, in_order)
            if self.bank_path is None:
                rows = g.all_gather_rows(self._bank_rows.result((dim,)), what="the bank's rows")
                bank_features = _placed(rows, order, in_order)
            else:
                bank_features = self._merged_bank_file(order, dim)
        sizes = set().union(*g.all_gather_object(sorted(self.image_sizes), what="the image sizes"))
        return RealStats(counts, sums, sq_sums, bank_features, bank_labels, encoder_name,
                         image_size=self._image_size({tuple(size) for size in sizes}))

    def _merged_bank_file(self, order: torch.Tensor, dim: int) -> torch.Tensor:
        """Rank 0 concatenates the ranks' part files into ``bank_path`` (each rank's rows are one
        contiguous run of the global rows, in rank order), then every rank maps it."""
        if not torch.equal(order, torch.arange(order.shape[0])):
            raise ValueError("bank_path under a process group needs a sized source (a tensor, a map-style "
                             "Dataset or a DataLoader over one), whose ranks read contiguous runs of rows; "
                             "this stream was read in interleaved batches: keep the bank in memory instead")
        g = self.group
        g.barrier("writing the bank's part files")
        if g.is_main:
            import shutil

            with open(self.bank_path, "wb") as out:
                for r in range(g.world_size):
                    with open(self._part_path(r), "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
                    os.remove(self._part_path(r))
        g.barrier("merging the bank's part files")
        return _map_bank(self.bank_path, order.shape[0], dim, self.bank_dtype)


class _Rows:
    """Rows appended batch by batch, returned as one tensor ``[N, *shape]`` of ``dtype`` on the CPU,
    at about the memory of the rows alone (never the batches plus their concatenation, which is twice).

    With ``capacity`` (the stream's length, when known) the first batch allocates one tensor of that
    many rows and every batch is copied into its slice; rows beyond it (a source longer than its
    ``len``) go to parts of their own. Parts are merged at the end one by one into a tensor allocated
    untouched (its pages become resident only as they are filled), each part freed once copied."""

    def __init__(self, capacity: Optional[int], dtype: torch.dtype):
        self.capacity, self.dtype = capacity, dtype
        self.parts = []  # [tensor, rows used]
        self.rows = 0

    def append(self, values: torch.Tensor) -> torch.Tensor:
        """Store ``values`` (converted to ``dtype``); returns the stored rows (a view)."""
        n = values.shape[0]
        if not self.parts and self.capacity:
            self.parts.append([torch.empty((max(self.capacity, n), *values.shape[1:]), dtype=self.dtype), 0])
        last = self.parts[-1] if self.parts else None
        if last is None or last[1] + n > last[0].shape[0]:
            last = [torch.empty(tuple(values.shape), dtype=self.dtype), 0]
            self.parts.append(last)
        dest = last[0][last[1]:last[1] + n]
        dest.copy_(values)
        last[1] += n
        self.rows += n
        return dest

    def result(self, shape: tuple) -> torch.Tensor:
        if len(self.parts) <= 1:
            whole, used = self.parts.pop() if self.parts else (torch.empty((0, *shape), dtype=self.dtype), 0)
            return whole if used == whole.shape[0] else whole[:used]
        out, start = torch.empty((self.rows, *shape), dtype=self.dtype), 0
        while self.parts:
            part, used = self.parts.pop(0)
            out[start:start + used] = part[:used]
            start += used
            del part
        return out


def check_bank_file_source(group: Group, bank_path, source) -> None:
    """Under a group a bank file is written by each rank as one contiguous run of rows (then merged), which
    needs a sized source: refuse an unsized stream before the pass, not after it."""
    if group.distributed and bank_path is not None and source_length(source) is None:
        raise ValueError("bank_path under a process group needs a sized source (a tensor, a map-style Dataset or "
                         "a DataLoader over one): an unsized stream is read in interleaved batches; keep the bank "
                         "in memory instead")


def _placed(rows: torch.Tensor, order: torch.Tensor, in_order: bool) -> torch.Tensor:
    """``rows`` (gathered in rank order) put at their global positions ``order``."""
    if in_order:
        return rows
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def source_length(source) -> Optional[int]:
    """The number of images of a tensor, a sized dataset or a DataLoader over one (None: unknown)."""
    if isinstance(source, torch.Tensor):
        return int(source.shape[0])
    try:
        return len(source.dataset) if isinstance(source, torch.utils.data.DataLoader) else len(source)
    except TypeError:
        return None


def _grow_add(sums, counts, sq_sums, part, num_classes: int, dim: int):
    """Add one batch's ``ClassSums`` into fp64 totals, growing the class axis when labels reveal more."""
    if sums is None:
        sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=part.sums.device)
        counts = torch.zeros(num_classes, dtype=torch.int64, device=part.sums.device)
        sq_sums = None if part.sq_sums is None else torch.zeros_like(sums)
    elif sums.shape[0] < num_classes:
        extra = num_classes - sums.shape[0]
        sums = torch.cat([sums, sums.new_zeros(extra, dim)])
        counts = torch.cat([counts, counts.new_zeros(extra)])
        if sq_sums is not None:
            sq_sums = torch.cat([sq_sums, sq_sums.new_zeros(extra, dim)])
    n = part.sums.shape[0]
    sums[:n] += part.sums.double()
    counts[:n] += part.counts.to(counts.device)
    if sq_sums is not None:
        sq_sums[:n] += part.sq_sums.double()
    return sums, counts, sq_sums


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _map_bank(path, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Memory-map a raw row-major bank file as a torch tensor ``[rows, dim]`` of ``dtype``."""
    if rows == 0:
        return torch.zeros(0, dim, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # numpy has no bfloat16: map the bytes as an integer type of the same width and reinterpret
    np_dtype = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize]
    arr = np.memmap(path, dtype=np_dtype, mode="c", shape=(rows, dim))  # copy-on-write: file never altered
    return torch.from_numpy(arr).view(dtype)
