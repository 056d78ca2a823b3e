"""Several processes, one result: fastdd's use of ``torch.distributed`` (launched by ``torchrun``).

``Group`` is the one door to the process group: when a default group is initialised (``torchrun`` and
``torch.distributed.init_process_group``), ``RealStats.from_data`` and ``fastdd.distill`` use it, or the
group passed as ``group=``; a run without one is a ``Group`` of one process, which communicates nothing.
NCCL groups exchange CUDA tensors, gloo groups CPU tensors; ``Group`` moves tensors to the backend's
device and back.

What is split, and how (docs/multi-gpu in the README gives the communication volume):

- **the real data** (``shard_rows``): a sized source (a tensor, a map-style Dataset, a DataLoader over
  one) is cut into contiguous runs of whole batches, one run per rank, at the batch boundaries one
  process would use; no image is read twice and nothing is padded (``DistributedSampler`` pads with
  duplicates, which would count some images twice). Per-batch fp32 class sums are then the ones of one
  process, and their fp64 totals are all-reduced: the statistics equal the single-process ones whatever
  the world size (exactly unless an fp64 addition rounds). An unsized stream is read by every rank, each
  encoding every ``world``-th batch.
- **the synthetic images** (``shard_bounds``): rank ``r`` owns a contiguous block of the ``C*ipc``
  images, with its parameters and Adam's state, so parameter memory divides by the world size.
- **every random draw** is made on every rank from the same generators (the same seed), and each rank
  keeps its part: the augmentation of every row, the real-batch indices, LGM's heads, CLP's bank rows.
  The run is then the single-process run, partitioned; a checkpoint holds one generator state.

``RowExchange`` is a step's communication: the features of each rank's rows (``[rows, D]``, no graph)
are gathered into the global row order, every rank computes the same loss and its gradient w.r.t. all
features, and takes back its own rows' slice (``fastdd.step``).

With gloo, a rank that stops makes the others' next collective fail; ``Group`` turns that failure (or
the group's timeout, ``init_process_group(timeout=...)``) into a ``DistributedError`` naming the rank and
the collective, instead of a hang or a bare backend trace. NCCL's collectives are asynchronous: there the
group's watchdog ends the waiting ranks after its timeout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

__all__ = ["Group", "DistributedError", "resolve_group", "shard_bounds", "RowExchange", "SINGLE"]


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, or the process group timed out.

    The process group is unusable afterwards: end the process (torchrun then ends the others) without
    ``destroy_process_group``, which on a broken group can hang or abort the process."""


@dataclass(frozen=True)
class Group:
    """The processes of one run: ``rank`` of ``world_size`` in ``group`` (None: the default group, or no
    group at all when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- tensors to and from the backend ---------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_rank_of_main(self) -> int:
        """The global rank of this group's rank 0 (torch.distributed's ``src`` and ``dst`` are global)."""
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def raise_first_failure(self, error: Optional[BaseException], what: str) -> None:
        """After a phase in which each rank works alone: every rank learns whether one failed, and all
        raise the first failing rank's error (its own error on that rank), so bad data found by one rank
        is one clear error everywhere instead of the others waiting in their next collective."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        outcomes = self.all_gather_object(None if error is None else _portable(error), what=f"{what} (outcomes)")
        failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
        if error is not None:
            raise error
        if failed:
            rank, e = failed[0]
            try:
                named = type(e)(f"rank {rank} of {self.world_size}: {e}")
            except Exception:  # noqa: BLE001 - an exception type that takes other arguments
                named = RuntimeError(f"rank {rank} of {self.world_size}: {type(e).__name__}: {e}")
            raise named from e

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
            raise DistributedError(f"fastdd rank {self.rank} of {self.world_size}: the collective {what} failed "
                                   f"(another rank stopped, or the process group timed out): {e}") from e

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        t = tensor.detach().to(self._device()).clone()
        self._call(what, dist.all_reduce, t, group=self.group)
        return t.to(tensor.device)

    def all_gather_rows(self, tensor: torch.Tensor, counts: Optional[Sequence[int]] = None,
                        what: str = "all_gather") -> torch.Tensor:
        """Every rank's ``tensor`` (``[rows_r, ...]``, rows may differ) concatenated in rank order, without
        a graph. ``counts``: each rank's row count when every rank knows them (else they are gathered).
        Sent padded to the largest count and trimmed; any dtype (sent as bytes)."""
        if not self.distributed:
            return tensor.detach()
        import torch.distributed as dist

        if counts is None:
            sizes = self.all_gather_rows(torch.tensor([tensor.shape[0]]), counts=[1] * self.world_size,
                                         what=f"{what} (row counts)")
            counts = sizes.tolist()
        counts = [int(c) for c in counts]
        if counts[self.rank] != tensor.shape[0]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows, the plan says {counts[self.rank]}")
        send = self._padded_bytes(tensor, max(counts))
        parts = [torch.empty_like(send) for _ in range(self.world_size)]
        self._call(what, dist.all_gather, parts, send, group=self.group)
        return self._rows_from_bytes(parts, counts, tensor)

    def _padded_bytes(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """``tensor``'s rows as bytes ``[rows, row bytes]`` on the backend's device, zero-padded to ``rows``."""
        row_bytes = tensor.element_size() * math.prod(tensor.shape[1:])
        raw = tensor.detach().contiguous().view(torch.uint8).reshape(tensor.shape[0], row_bytes)
        send = torch.zeros(rows, row_bytes, dtype=torch.uint8, device=self._device())
        send[:tensor.shape[0]] = raw.to(self._device())
        return send

    @staticmethod
    def _rows_from_bytes(parts, counts, like: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(like.device)
        return rows.view(like.dtype).reshape(sum(counts), *like.shape[1:])

    def gather_rows(self, tensor: torch.Tensor, what: str = "gather") -> Optional[torch.Tensor]:
        """Every rank's ``tensor`` concatenated in rank order on rank 0 (None on the others): what only
        rank 0 writes (a checkpoint), without a copy on every rank."""
        if not self.distributed:
            return tensor.detach()
        import torch.distributed as dist

        counts = self.all_gather_rows(torch.tensor([tensor.shape[0]]), counts=[1] * self.world_size,
                                      what=f"{what} (row counts)").tolist()
        send = self._padded_bytes(tensor, max(counts))
        parts = [torch.empty_like(send) for _ in range(self.world_size)] if self.is_main else None
        self._call(what, dist.gather, send, parts, dst=self._global_rank_of_main(), group=self.group)
        return self._rows_from_bytes(parts, counts, tensor) if self.is_main else None

    def all_gather_object(self, obj, what: str = "all_gather_object") -> List[Any]:
        """``obj`` of every rank, in rank order (small Python objects only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        self._call(what, dist.all_gather_object, out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, what: str = "broadcast"):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._call(what, dist.broadcast_object_list, box, src=self._global_rank_of_main(), group=self.group)
        return box[0]

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call(what, dist.barrier, group=self.group)

    def agree(self, value, name: str) -> None:
        """Every rank holds the same ``value`` (a setting), else a ValueError naming it on every rank."""
        if not self.distributed:
            return
        values = self.all_gather_object(value, what=f"comparing {name}")
        if any(v != values[0] for v in values):
            raise ValueError(f"{name} differs between the ranks ({values[:8]}): every rank of a run must be "
                             "given the same arguments and data")


SINGLE = Group()


def _portable(error: BaseException) -> BaseException:
    """``error`` as it can travel between processes: itself if it pickles with its message, else a
    RuntimeError carrying its type and message."""
    import pickle

    try:
        copy = pickle.loads(pickle.dumps(error))
        if str(copy) == str(error):
            return error
    except Exception:  # noqa: BLE001 - an unpicklable exception travels as its text
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def resolve_group(group=None) -> Group:
    """The ``Group`` of this run: ``group`` (a ``torch.distributed`` ProcessGroup or a ``Group``), else the
    default process group when one is initialised (``torchrun``), else a single process."""
    if isinstance(group, Group):
        return group
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: a process group was given but torch.distributed is not initialised")
    return Group(dist.get_rank(group), dist.get_world_size(group), group, str(dist.get_backend(group)))


def shard_bounds(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(lo, hi)``: rank ``rank``'s contiguous share of ``total`` items, sizes differing by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size


# the command line's group timeout: rank 0 alone writes checkpoints, statistics and merged banks of many
# GB while the others wait in a barrier, which NCCL's 10-minute default can cut short
DEFAULT_TIMEOUT_S = float(os.environ.get("FASTDD_DIST_TIMEOUT", 3600))


def init_from_environment(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) and none exists: NCCL when CUDA is available (on the rank's ``LOCAL_RANK`` GPU), else
    gloo, with a ``timeout_s`` timeout (``FASTDD_DIST_TIMEOUT``, default an hour). Returns True if it did."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


class RowExchange:
    """A step's features across the ranks. Global row ``k * N + i`` is image ``i`` under augmentation
    draw ``k * N + i``; rank ``r`` owns images ``[lo_r, hi_r)`` and so the rows ``local_rows`` (``k``-major).
    ``gather`` gives every row's features in the global order; ``local`` takes this rank's rows of a
    tensor over all rows (the loss gradient)."""

    def __init__(self, group: Group, num_images: int, copies: int, device):
        self.group = group
        bounds = [shard_bounds(num_images, r, group.world_size) for r in range(group.world_size)]
        rows = [torch.cat([torch.arange(lo, hi) + k * num_images for k in range(copies)]) for lo, hi in bounds]
        self.counts = [int(r.numel()) for r in rows]
        self.local_rows = rows[group.rank].to(device)
        order = torch.empty(num_images * copies, dtype=torch.long)
        order[torch.cat(rows)] = torch.arange(num_images * copies)
        self.order = order.to(device)  # global row -> position in the rank-order concatenation

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_rows(local, self.counts, what="gathering the synthetic features")[self.order]

    def local(self, every_row: torch.Tensor) -> torch.Tensor:
        return every_row[self.local_rows]


# --------------------------------------------------------------------------------------------------
# The real data, split over the ranks
# --------------------------------------------------------------------------------------------------

@dataclass
class ShardBatch:
    """One batch of the global stream: its index, its first row, its size and, when this rank reads
    it, the validated ``(images, labels)`` (None for another rank's batch)."""

    index: int
    offset: int
    size: int
    data: Optional[Tuple[torch.Tensor, torch.Tensor]]


def shard_batches(source, labels, batch_size: int, group: Group):
    """Every batch of the global stream in order (``ShardBatch``), with the data of this rank's own.

    One process reads ``fastdd.data.iterate_batches(source, labels, batch_size)``. Under a group a sized
    source is cut into contiguous runs of whole batches (``shard_bounds`` over the batches; a DataLoader's
    own batches, listed on rank 0, keep its sampler's order) and a rank reads only its run; an unsized
    stream is read whole by every rank, which keeps every ``world``-th batch. Either way a rank knows the
    size of every batch, so draws made per batch (the real initialisation's random keys) are the ones of
    one process."""
    from .data import iterate_batches

    if not group.distributed:
        offset = 0
        for i, batch in enumerate(iterate_batches(source, labels, batch_size=batch_size)):
            yield ShardBatch(i, offset, batch[1].shape[0], batch)
            offset += batch[1].shape[0]
        return
    plan = _batch_plan(source, labels, batch_size, group)
    if plan is None:  # an unsized stream: every rank reads it, each encodes every world-th batch
        offset = 0
        for i, batch in enumerate(iterate_batches(source, labels, batch_size=batch_size)):
            n = batch[1].shape[0]
            yield ShardBatch(i, offset, n, batch if i % group.world_size == group.rank else None)
            offset += n
        return
    sizes, own_source, own_labels = plan
    first, last = shard_bounds(len(sizes), group.rank, group.world_size)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    own = iterate_batches(own_source, own_labels, batch_size=batch_size) if last > first else iter(())
    for i, n in enumerate(sizes):
        data = next(own) if first <= i < last else None
        if data is not None and data[1].shape[0] != n:
            raise ValueError(f"batch {i} of the data source holds {data[1].shape[0]} images where the batch plan "
                             f"says {n}: under a process group the source must yield its batches as listed "
                             "(a collate_fn that drops items, or a source whose length differs between ranks)")
        yield ShardBatch(i, offsets[i], n, data)


def _batch_plan(source, labels, batch_size: int, group: Group):
    """``(every batch's size, this rank's part of the source, its labels)`` of a sized source, or None."""
    from torch.utils.data import DataLoader, IterableDataset, Subset

    if isinstance(source, DataLoader):
        from torch.utils.data.distributed import DistributedSampler

        if isinstance(source.sampler, DistributedSampler) or isinstance(
                getattr(source.batch_sampler, "sampler", None), DistributedSampler):
            raise ValueError("images: a DataLoader with a DistributedSampler reads a share per rank (and pads "
                             "it with duplicates); pass the DataLoader or the dataset of the whole data: fastdd "
                             "splits it over the ranks itself")
        if isinstance(source.dataset, IterableDataset) or source.batch_sampler is None:
            return None
        batches = group.broadcast_object([list(b) for b in source.batch_sampler] if group.is_main else None,
                                         what="listing the DataLoader's batches")
        first, last = shard_bounds(len(batches), group.rank, group.world_size)
        workers = source.num_workers
        loader = DataLoader(source.dataset, batch_sampler=batches[first:last], num_workers=workers,
                            collate_fn=source.collate_fn, pin_memory=source.pin_memory, timeout=source.timeout,
                            worker_init_fn=source.worker_init_fn, generator=source.generator,
                            multiprocessing_context=source.multiprocessing_context,
                            prefetch_factor=source.prefetch_factor if workers > 0 else None,
                            persistent_workers=source.persistent_workers and workers > 0,
                            pin_memory_device=source.pin_memory_device, in_order=getattr(source, "in_order", True))
        return [len(b) for b in batches], loader, None
    if isinstance(source, torch.Tensor):
        n = source.shape[0]
    elif isinstance(source, IterableDataset) or not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
        return None
    else:
        n = len(source)
    sizes = [min(batch_size, n - lo) for lo in range(0, n, batch_size)]
    first, last = shard_bounds(len(sizes), group.rank, group.world_size)
    lo, hi = first * batch_size, min(last * batch_size, n)
    if isinstance(source, torch.Tensor):
        if labels is not None and len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries for {n} images")
        return sizes, source[lo:hi], None if labels is None else torch.as_tensor(labels)[lo:hi]
    return sizes, Subset(source, range(lo, hi)), labels


def on_main(group: Group, fn, what: str):
    """``fn()`` run on rank 0 only, its result (or the exception it raised) handed to every rank: a check
    that fails on rank 0 (a file, a checkpoint) fails on every rank, with rank 0's message, instead of
    leaving the others waiting in their next collective."""
    if not group.distributed:
        return fn()
    outcome = None
    if group.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", e)
    outcome = group.broadcast_object(outcome, what=what)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]
