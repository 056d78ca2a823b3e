"""Drop-in distillation losses over features, usable from any codebase.

Each takes synthetic features ``zs [N, D]`` (and labels ``ys [N]``) and returns a scalar that
back-propagates into ``zs``::

    stats = fastdd.RealStats.from_data(loader, encoder, bank=True)
    loss = fastdd.nn.FlowMatchingLoss(stats)(zs, ys)
    loss = fastdd.nn.ClosedFormProbeLoss(stats, lam=1.0)(zs, ys)
    loss = fastdd.nn.LinearGradientMatchingLoss()(zs, ys, zr, yr)
    loss = fastdd.nn.DistributionMatchingLoss(stats)(zs, ys)
"""

from .methods import ClosedFormProbeLoss, DistributionMatchingLoss, FlowMatchingLoss, LinearGradientMatchingLoss

__all__ = ["FlowMatchingLoss", "ClosedFormProbeLoss", "LinearGradientMatchingLoss", "DistributionMatchingLoss"]
