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
from ._checks import check_features

__all__ = ["LinearGradientMatchingLoss"]


class LinearGradientMatchingLoss(nn.Module):
    """``LinearGradientMatchingLoss()(zs, ys, zr, yr, head=None) -> 1 - cos(g_real, g_syn)``.

    Args:
        num_classes: C. When None it is inferred per call as ``max(ys.max(), yr.max()) + 1`` (a host
            sync; pass it to avoid one per step) unless a head is given.
        head_std: standard deviation of the fresh head's weights (LGM: 0.01).
        generator: the ``torch.Generator`` drawing fresh heads (on the features' device), for
            reproducibility; None uses the global RNG.

    ``head=(W [C, D], b [C])`` uses that head instead of a fresh one.
    """

    def __init__(self, num_classes: Optional[int] = None, head_std: float = 0.01,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not float(head_std) > 0:
            raise ValueError(f"head_std must be > 0, got {head_std!r}")
        self.num_classes = num_classes
        self.head_std = float(head_std)
        self.generator = generator

    def sample_head(self, num_classes: int, dim: int, device=None,
                    dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """A fresh head: ``W ~ N(0, head_std^2)`` ``[C, D]``, ``b = 0`` ``[C]``."""
        gen = self.generator
        gdev = gen.device if gen is not None else device
        w = torch.randn(num_classes, dim, generator=gen, device=gdev, dtype=torch.float32) * self.head_std
        return w.to(device=device, dtype=dtype), torch.zeros(num_classes, device=device, dtype=dtype)

    def forward(self, zs: torch.Tensor, ys: torch.Tensor, zr: torch.Tensor, yr: torch.Tensor,
                head: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        check_features(zs, ys)
        check_features(zr, yr, "zr", "yr", dim=zs.shape[1])
        if zr.device != zs.device:
            raise ValueError(f"zr is on {zr.device} but zs is on {zs.device}")
        if head is None:
            c = self.num_classes
            if c is None:
                c = int(torch.maximum(ys.max(), yr.max())) + 1
            w, b = self.sample_head(c, zs.shape[1], zs.device)
        else:
            if not isinstance(head, (tuple, list)) or len(head) != 2:
                raise ValueError("head must be a pair (W [C, D], b [C])")
            w, b = head
            if w.dim() != 2 or w.shape[1] != zs.shape[1] or b.dim() != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"head must be (W [C, {zs.shape[1]}], b [C]), got W {tuple(w.shape)}, "
                                 f"b {tuple(b.shape)}")
            w, b = w.to(zs.device, torch.float32), b.to(zs.device, torch.float32)
        zs32 = zs if zs.dtype == torch.float32 else zs.float()
        gw_s, gb_s = ops.linear_head_gradient(zs32, ys, w, b)
        with torch.no_grad():
            gw_r, gb_r = ops.linear_head_gradient(zr.detach().float(), yr, w, b)
        g_syn = torch.cat([gw_s.reshape(-1), gb_s.reshape(-1)])
        g_real = torch.cat([gw_r.reshape(-1), gb_r.reshape(-1)])
        return 1.0 - F.cosine_similarity(g_real, g_syn, dim=0, eps=1e-12)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, head_std={self.head_std}"
