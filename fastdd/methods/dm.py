"""DM, distribution matching (Zhao and Bilen, WACV 2023) on the features of a frozen encoder.

Loss: per class, the squared Euclidean distance between the mean synthetic feature ``S_c`` (over the
ipc images of class c and their augmented copies) and the real class mean ``mu_c``, summed over classes:
``L = sum_c ||S_c - mu_c||^2``. The original matches the means under many randomly initialised networks;
with one frozen pre-trained encoder it is the first moment of the class-conditional feature distribution,
a standard baseline of this literature. The real side is the class means, computed once
(``RealStats``), so DM touches no real image while distilling.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..validate import checks_enabled, features as check_features
from .base import Method, Objective, RealNeeds, Recipe, class_means

__all__ = ["DistributionMatchingLoss", "METHOD"]


class DistributionMatchingLoss(nn.Module):
    """``DistributionMatchingLoss(stats)(zs, ys) -> sum_c ||mean(zs[ys == c]) - mu_c||^2``.

    Args:
        stats: a ``fastdd.RealStats`` (its class means are used) or the class means ``[C, D]`` themselves.

    Call with ``zs [N, D]`` synthetic features and ``ys [N]`` labels in ``0..C-1``; every class must
    appear in ``ys`` (checked while ``FASTDD_CHECKS`` is on). Returns a scalar differentiable w.r.t. ``zs``.
    """

    def __init__(self, stats):
        super().__init__()
        self.register_buffer("real_means", class_means(stats, "DistributionMatchingLoss(stats)",
                                                       "distribution matching"))

    @property
    def num_classes(self) -> int:
        return self.real_means.shape[0]

    def forward(self, zs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        check_features(zs, ys, dim=self.real_means.shape[1], num_classes=self.num_classes)
        means = self.real_means.to(zs.device)
        z = zs if zs.dtype in (torch.float32, torch.float64) else zs.float()
        # counts by index_add, not bincount: bincount sizes its output from the labels' maximum (a host
        # sync on an accelerator, a data-dependent shape under torch.compile)
        counts = z.new_zeros(self.num_classes).index_add(0, ys, z.new_ones(z.shape[0]))
        if checks_enabled() and bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"ys: classes {missing[:10]} have no synthetic row; every class must appear")
        sums = z.new_zeros(self.num_classes, z.shape[1]).index_add(0, ys, z)
        syn_means = sums / counts.clamp(min=1).unsqueeze(1)
        return (syn_means - means.to(z.dtype)).pow(2).sum()

    def extra_repr(self) -> str:
        return f"classes={self.real_means.shape[0]}, dim={self.real_means.shape[1]}"


METHOD = Method(
    name="dm", title="distribution matching on frozen features (Zhao and Bilen, WACV 2023)",
    matches="the real class means, by the squared distance of the synthetic class means", real_per_step="none",
    build=lambda context, options: Objective(DistributionMatchingLoss(context.stats).to(context.device)),
    needs=RealNeeds(means=True),
    recipes={"paper": Recipe(
        source="Zhao and Bilen (WACV 2023), the official main_DM.py, where it applies: images initialised "
               "from random real images of their class, optimised as pixels for 20000 iterations, one "
               "augmented pass of the synthetic set per step",
        values=dict(init="real", parameterization="pixels", steps=20000, copies=1),
        not_applicable=("SGD on the pixels with lr 1 and momentum 0.5: fastdd's loop runs Adam, so lr keeps "
                        "its calibrated default",
                        "DSA augmentation (colour, crop, cutout, flip, scale, rotate; one draw shared by the "
                        "real and synthetic batch): not in fastdd's chain, the calibrated chain is kept",
                        "a freshly initialised ConvNet each step: here the frozen encoder",
                        "256 real images per class each step: here the exact class means"))})
