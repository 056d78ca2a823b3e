"""fastdd: fast, memory-flat dataset distillation for frozen pre-trained vision encoders.

Public names (imported lazily, so ``import fastdd`` stays cheap and never touches a device):

- ``fastdd.distill``, ``fastdd.DistilledSet``      the distillation loop (LGM, SFM, CLP, DM: ``fastdd.methods``)
- ``fastdd.evaluate``                              the linear-probe protocol (``fastdd.probe``: and the baselines)
- ``fastdd.RealStats``                             streaming class statistics and feature bank
- ``fastdd.nn``                                    drop-in losses over features
- ``fastdd.ops``                                   the fused ops (Triton / CUDA / torch)
- ``fastdd.data``, ``fastdd.encoders``             built-in real data and offline pretrained encoders
- ``fastdd.export``                                distilled sets in other codebases' formats, and back
- ``fastdd.distributed``                           sharing a run over ``torch.distributed`` ranks
- ``fastdd.files``, ``fastdd.logs``, ``fastdd.checkpoints``  checked files, run logs, checkpoints

Every module below ``fastdd`` whose name has no leading underscore is reachable as an attribute.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "distill": ("fastdd.api", "distill"),
    "DistilledSet": ("fastdd.api", "DistilledSet"),
    "evaluate": ("fastdd.probe", "evaluate"),
    "RealStats": ("fastdd.stats", "RealStats"),
}
_SUBMODULES = {"nn", "ops", "data", "encoders", "api", "stats", "probe", "images", "augment", "methods", "cli",
               "export", "distributed", "files", "logs", "checkpoints", "distilled", "realdata", "step", "validate"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastdd.{name}")
    else:
        raise AttributeError(f"module 'fastdd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
