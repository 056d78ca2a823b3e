"""LGM, linear gradient matching (arXiv 2511.16674), as a loss over features.

Per call: a linear head ``(W [C, D], b [C])`` (a fresh ``W ~ N(0, head_std^2)``, ``b = 0`` unless one is
given); the cross-entropy gradients of that head on each side, in closed form
(``fastdd.ops.linear_head_gradient``: ``dCE/dW = (softmax(Z W^T + b) - Y)^T Z / B``,
``dCE/db = colsum(softmax - Y) / B``, so no double backward); ``g = [vec dCE/dW, dCE/db]``;
``loss = 1 - cos(g_real, g_syn)``. The real side carries no graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .base import LOOP_DEFAULTS, Context, Method, Objective, Option, RealNeeds, Recipe
from ..augment import CROP_SCALE, NOISE_PROB
from ..validate import class_labels, features as check_features, positive_float, positive_int

__all__ = ["LinearGradientMatchingLoss", "METHOD"]


class LinearGradientMatchingLoss(nn.Module):
    """``LinearGradientMatchingLoss()(zs, ys, zr, yr, head=None) -> 1 - cos(g_real, g_syn)``.

    Args:
        num_classes: C. When None it is inferred per call as ``max(ys.max(), yr.max()) + 1`` (a host
            sync; pass it to avoid one per step) unless a head is given; ys and yr must then hold the
            same classes.
        head_std: standard deviation of the fresh head's weights (LGM: 0.01).
        generator: the ``torch.Generator`` drawing fresh heads (on the features' device), for
            reproducibility; None uses the global RNG. ``torch.compile(fullgraph=True)`` needs None (it
            cannot trace a generator) and ``num_classes`` (or a head).

    ``head=(W [C, D], b [C])`` uses that head instead of a fresh one. ``real_reduce(gw, gb, rows=n)``:
    ``zr, yr`` are one share of the real rows; it turns the share's head gradients (means over its ``n``
    rows) into those of all the rows (``fastdd.distill`` under a process group: an all-reduce).
    """

    def __init__(self, num_classes: Optional[int] = None, head_std: float = 0.01,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes, allow_none=True, minimum=2)
        self.head_std = positive_float("head_std", head_std)
        self.generator = generator

    def sample_head(self, num_classes: int, dim: int, device=None,
                    dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """A fresh head: ``W ~ N(0, head_std^2)`` ``[C, D]``, ``b = 0`` ``[C]``."""
        gen = self.generator
        gdev = gen.device if gen is not None else device
        w = torch.randn(num_classes, dim, generator=gen, device=gdev, dtype=torch.float32) * self.head_std
        return w.to(device=device, dtype=dtype), torch.zeros(num_classes, device=device, dtype=dtype)

    def forward(self, zs: torch.Tensor, ys: torch.Tensor, zr: torch.Tensor, yr: torch.Tensor,
                head: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, real_reduce=None) -> torch.Tensor:
        check_features(zs, ys)
        check_features(zr, yr, "zr", "yr")
        if zr.shape[1] != zs.shape[1]:
            raise ValueError(f"zs and zr must have the same feature dimension, got zs {tuple(zs.shape)}, "
                             f"zr {tuple(zr.shape)}")
        if zr.device != zs.device:
            raise ValueError(f"zr is on {zr.device} but zs is on {zs.device}")
        same_classes = True
        if head is None:
            c = self.num_classes
            if c is None:
                c, same_classes = _inferred_num_classes(ys, yr)
            w, b = self.sample_head(c, zs.shape[1], zs.device)
        else:
            if not isinstance(head, (tuple, list)) or len(head) != 2:
                raise ValueError("head must be a pair (W [C, D], b [C])")
            w, b = head
            if w.dim() != 2 or w.shape[1] != zs.shape[1] or b.dim() != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"head must be (W [C, {zs.shape[1]}], b [C]), got W {tuple(w.shape)}, "
                                 f"b {tuple(b.shape)}")
            w, b = w.to(zs.device, torch.float32), b.to(zs.device, torch.float32)
        class_labels("ys", ys, zs.shape[0], w.shape[0], zs.device, in_step=True)
        class_labels("yr", yr, zr.shape[0], w.shape[0], zs.device, in_step=True)
        if not same_classes:
            only_s = sorted(set(ys.unique().tolist()) - set(yr.unique().tolist()))
            only_r = sorted(set(yr.unique().tolist()) - set(ys.unique().tolist()))
            raise ValueError(f"ys and yr must hold the same classes when num_classes is inferred (None): "
                             f"classes {only_s[:10]} only in ys, {only_r[:10]} only in yr; pass num_classes")
        zs32 = zs if zs.dtype == torch.float32 else zs.float()
        gw_s, gb_s = ops.linear_head_gradient(zs32, ys, w, b)
        with torch.no_grad():
            gw_r, gb_r = ops.linear_head_gradient(zr.detach().float(), yr, w, b)
            if real_reduce is not None:  # this rank's share of the real rows: the means over every rank's
                gw_r, gb_r = real_reduce(gw_r, gb_r, rows=zr.shape[0])
        g_syn = torch.cat([gw_s.reshape(-1), gb_s.reshape(-1)])
        g_real = torch.cat([gw_r.reshape(-1), gb_r.reshape(-1)])
        return 1.0 - F.cosine_similarity(g_real, g_syn, dim=0, eps=1e-12)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, head_std={self.head_std}"


def _inferred_num_classes(ys: torch.Tensor, yr: torch.Tensor) -> Tuple[int, bool]:
    """``(C, same)``: C = max label + 1 and whether ys and yr hold the same set of classes, in one host
    transfer (as C alone needed). A class on one side only would still get a head row: a silently
    different loss, so the caller refuses it."""
    ys, yr = ys.long(), yr.long()
    same = torch.isin(ys, yr).all() & torch.isin(yr, ys).all()
    hi, same = torch.stack([torch.maximum(ys.max(), yr.max()), same.long()]).tolist()
    return hi + 1, bool(same)


class _GradientMatching(Objective):
    """LGM's objective: a fresh class-balanced real batch of ``ipc * K`` images per class every step,
    entering the loss only through its head gradient (a mean over the rows: ``sums_real_rows``)."""

    sums_real_rows = True

    def __init__(self, context: Context, head_std: float):
        super().__init__(LinearGradientMatchingLoss(context.num_classes, head_std, context.device_generator))
        self.context = context

    def real_batch(self):
        c = self.context
        return c.real_batches(c.ipc * c.copies, c.cpu_generator)


METHOD = Method(
    name="lgm", title="linear gradient matching (arXiv 2511.16674)",
    matches="the gradient of a random linear head on a real batch", real_per_step="`ipc*K*C` through the encoder",
    build=lambda context, options: _GradientMatching(context, options["head_std"]),
    needs=RealNeeds(real_batches=True), reference=True,
    # LGM keeps its algorithm (K = 10 copies, a fresh real batch and a fresh head every step); its published
    # recipe is recipes["paper"].
    defaults=dict(LOOP_DEFAULTS, copies=10),
    recipes={"paper": Recipe(
        source="arXiv 2511.16674 and its official code's distillation config: Adam lr 2e-3, 5000 iterations, "
               "10 augmentations per batch, a pyramid from noise extended every 200 steps, the 'standard' "
               "chain (flip 0.5, crop area U[0.08, 1], noise p 0.5 of 0.5 + 0.2 N(0, 1)), synthetic and real "
               "images at 256 px cropped to 224, autocast; fastdd's flip_prob, crop_log_ratio, noise_mean, "
               "noise_std and head_std defaults are LGM's already",
        values=dict(init="noise", lr=2e-3, steps=5000, copies=10, parameterization="pyramid", extend_every=200,
                    crop_scale=CROP_SCALE, noise_prob=NOISE_PROB, crop_size=224),
        gpu_autocast=torch.float16, image_size=256,
        not_applicable=("K = 3 instead of 10 on ImageNet-1K, for memory: pass copies=3 there",))},
    options={"head_std": Option(0.01, "standard deviation of the random head's weights", positive_float)})
