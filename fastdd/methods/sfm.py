"""SFM, statistical flow matching (arXiv 2602.05391), as a loss over synthetic features.

Real flow (constant, from the real class means mu_c): ``F_r[c] = mean_{k != c} mu_k - mu_c`` (C-1
denominator, class centres unweighted). Synthetic flow from the class means ``S_c`` of the synthetic
features (over the ipc images of class c and any augmented copies): ``F_s[c] = mean_{k != c} S_k - S_c``.
Loss: ``1 - cos(vec F_r, vec F_s)``, one cosine over the flattened ``C*D`` vectors.

Why it works: at W = 0 the cross-entropy gradient of a linear head on a class-balanced batch is
``((C-1)/C^2) * flow``; LGM matches a noisy batch estimate of this direction, SFM the exact one.

The computation is ``fastdd.ops.real_flow`` (once, at construction) and ``fastdd.ops.flow_matching_loss``
(per call). ``nontarget_denominator="samples"`` reproduces the official code's ``C*ipc - 1`` denominator
(a bug for ipc > 1; kept only as a compatibility option): it counts the distinct synthetic images, so with
``copies`` augmented copies of them per step (``zs`` has ``copies * C * ipc`` rows) it stays ``C*ipc - 1``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from .base import Context, Method, Objective, Option, RealNeeds, Recipe, class_means
from ..validate import features as check_features, positive_int

__all__ = ["FlowMatchingLoss", "METHOD"]


class FlowMatchingLoss(nn.Module):
    """``FlowMatchingLoss(stats)(zs, ys) -> 1 - cos(F_r, F_s)``.

    Args:
        stats: a ``fastdd.RealStats`` (its class means are used) or the class means ``[C, D]`` themselves.
        nontarget_denominator: ``"classes"`` (C - 1, correct) or ``"samples"`` (the official code's).
        copies: K, the augmented copies of the synthetic set that ``zs`` holds (copy-major, as ``distill``
            builds them); ``"samples"`` divides by the ``N / K - 1`` distinct images, not ``N - 1``.

    Call with ``zs [N, D]`` synthetic features and ``ys [N]`` labels in ``0..C-1``; every class must
    appear in ``ys``. Returns a scalar differentiable w.r.t. ``zs``.
    """

    def __init__(self, stats, nontarget_denominator: str = "classes", copies: int = 1):
        super().__init__()
        if nontarget_denominator not in ("classes", "samples"):
            raise ValueError(f"nontarget_denominator must be 'classes' or 'samples', got {nontarget_denominator!r}")
        self.copies = positive_int("copies", copies)
        means = class_means(stats, "FlowMatchingLoss(stats)", "flow matching")
        flow = ops.real_flow(means)
        # identical class means (up to rounding): the loss would be a constant with zero gradient
        if float(flow.abs().max()) <= 1e-5 * float(means.abs().max()):
            raise ValueError("stats: every class has the same mean (zero real flow), so there is nothing to "
                             "match: check the encoder (constant features?) and the labels")
        self.nontarget_denominator = nontarget_denominator
        self.register_buffer("real_flow", flow)

    @property
    def num_classes(self) -> int:
        return self.real_flow.shape[0]

    def forward(self, zs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        check_features(zs, ys, dim=self.real_flow.shape[1], num_classes=self.num_classes)
        real_flow = self.real_flow.to(zs.device)
        if zs.shape[0] % self.copies:
            raise ValueError(f"zs has {zs.shape[0]} rows, not a whole number of the {self.copies} copies")
        return ops.flow_matching_loss(zs, ys, real_flow, nontarget_denominator=self.nontarget_denominator,
                                      num_images=zs.shape[0] // self.copies)

    def extra_repr(self) -> str:
        return f"classes={self.real_flow.shape[0]}, dim={self.real_flow.shape[1]}, " \
               f"nontarget_denominator={self.nontarget_denominator!r}, copies={self.copies}"


def _build(context: Context, options: dict) -> Objective:
    loss = FlowMatchingLoss(context.stats, nontarget_denominator=options["nontarget_denominator"],
                            copies=context.copies)
    return Objective(loss.to(context.device))


METHOD = Method(
    name="sfm", title="statistical flow matching (arXiv 2602.05391)",
    matches='constant class-centre "flows" precomputed once', real_per_step="none",
    build=_build, needs=RealNeeds(means=True),
    options={"nontarget_denominator": Option(
        "classes", "denominator of the non-target class mean: 'classes' (C - 1) or 'samples' (the official "
        "code's C*ipc - 1)", choices=("classes", "samples"))},
    recipes={"paper": Recipe(
        source="arXiv 2602.05391 (its abstract; the paper's training hyper-parameters are not in fastdd's "
               "sources): a single augmentation pass of the synthetic set per step, the C - 1 non-target "
               "denominator of the paper's definition (the default option)",
        values=dict(copies=1),
        not_public=("steps", "lr", "init", "parameterization", "augmentation chain", "image size and crop",
                    "autocast"))})
