"""One distillation step, in the four pieces that a process group slots into.

1. **decode and augment** this process's rows: row ``r`` of the K-times repeated synthetic set is image
   ``r % N`` under augmentation draw ``r`` (``SyntheticRows.rows``);
2. **encode**: ``z = phi(x)`` (``encode``), optionally under ``torch.autocast``;
3. **loss on the (gathered) features**: ``loss_fn(zs)`` over every row's features;
4. **backward into this process's rows**: ``dL/dz`` flows back through the encoder, the augmentation and
   the decoding into the image parameters.

``plain_step`` runs the pieces once over all rows with one graph. ``chunked_step`` is memory-flat: the
features are first computed without a graph, chunk by chunk; the loss gradient ``dL/dz_s`` is taken
w.r.t. those features; then each chunk of ``chunk_size`` rows is decoded, augmented (with the same
draws) and encoded again and back-propagates its slice of ``dL/dz_s``. Decoding and augmentation happen
per chunk too, so memory beyond the image parameters and Adam's state does not grow with the number of
synthetic images; the gradient equals the plain one up to float summation order (tested).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .augment import Augment, AugmentParams

__all__ = ["SyntheticRows", "encode", "encode_without_graph", "plain_step", "chunked_step"]

LossFn = Callable[[torch.Tensor], torch.Tensor]


class SyntheticRows:
    """The rows of one step: the image parameterisation ``images`` (``fastdd.images``), repeated over the
    augmentation draws ``params`` (one per row, ``len(params) = K * N``)."""

    def __init__(self, images: torch.nn.Module, augment: Augment, params: AugmentParams):
        self.images, self.augment, self.params = images, augment, params
        self.num_images = images.num_images
        self.num_rows = len(params)

    def rows(self, lo: int, hi: int, decoded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Piece 1: the augmented images of rows ``lo..hi-1``; only their images are decoded, unless all
        the ``decoded`` images are given."""
        device = self.params.affine.device
        index = torch.arange(lo, hi, device=device) % self.num_images
        images = self.images.decode(index) if decoded is None else torch.index_select(decoded, 0, index)
        return self.augment.apply(images, self.params[lo:hi])


def encode(encoder, x: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Piece 2: float32 features ``[B, D]`` of images ``x``, under autocast when ``autocast_dtype``."""
    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            return encoder(x).float()
    return encoder(x).float()


def encode_without_graph(encoder, augment: Augment, images: torch.Tensor, params: AugmentParams,
                         chunk_size: Optional[int], autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Features of ``augment(images, params)`` without a graph, ``chunk_size`` rows at a time (all at once
    for None): the real side of a step (LGM's real batch)."""
    step = chunk_size or images.shape[0]
    with torch.no_grad():
        return torch.cat([encode(encoder, augment.apply(images[lo:lo + step], params[lo:lo + step]), autocast_dtype)
                          for lo in range(0, images.shape[0], step)])


def plain_step(rows: SyntheticRows, encoder, loss_fn: LossFn, autocast_dtype: Optional[torch.dtype] = None,
               exchange=None) -> torch.Tensor:
    """All rows at once with one graph: decode every image, augment, encode, loss, backward. With an
    ``exchange`` (``fastdd.distributed.RowExchange``) the rows are this rank's: their features are
    gathered with every rank's (no graph), the loss and its gradient w.r.t. all features are computed,
    and this rank's slice flows back through its graph."""
    zs = encode(encoder, rows.rows(0, rows.num_rows, decoded=rows.images()), autocast_dtype)
    if exchange is None:
        loss = loss_fn(zs)
        loss.backward()
        return loss.detach()
    every = exchange.gather(zs.detach()).requires_grad_(True)
    loss = loss_fn(every)
    (grad_z,) = torch.autograd.grad(loss, every)
    zs.backward(exchange.local(grad_z))
    return loss.detach()


def chunked_step(rows: SyntheticRows, encoder, loss_fn: LossFn, chunk_size: int,
                 autocast_dtype: Optional[torch.dtype] = None, exchange=None) -> torch.Tensor:
    """The memory-flat step (see the module docstring): same gradient as ``plain_step``; with an
    ``exchange``, across the ranks as there."""
    spans = [(lo, min(lo + chunk_size, rows.num_rows)) for lo in range(0, rows.num_rows, chunk_size)]
    with torch.no_grad():
        zs = torch.cat([encode(encoder, rows.rows(lo, hi), autocast_dtype) for lo, hi in spans])
    if exchange is not None:
        zs = exchange.gather(zs)
    zs.requires_grad_(True)
    loss = loss_fn(zs)                                   # piece 3, over every row's features
    (grad_z,) = torch.autograd.grad(loss, zs)
    if exchange is not None:
        grad_z = exchange.local(grad_z)
    for lo, hi in spans:                                 # piece 4, this process's rows chunk by chunk
        encode(encoder, rows.rows(lo, hi), autocast_dtype).backward(grad_z[lo:hi])
    return loss.detach()
