"""The distillation losses, one module each, as ``nn.Module``s over features (re-exported by ``fastdd.nn``).

- ``sfm.FlowMatchingLoss``             statistical flow matching (needs the real class means)
- ``clp.ClosedFormProbeLoss``          closed-form linear-probe distillation (needs a real feature bank)
- ``lgm.LinearGradientMatchingLoss``   linear gradient matching (needs a real feature batch per call)
"""

from .clp import ClosedFormProbeLoss
from .lgm import LinearGradientMatchingLoss
from .sfm import FlowMatchingLoss

__all__ = ["FlowMatchingLoss", "ClosedFormProbeLoss", "LinearGradientMatchingLoss"]
