"""Fused ops of fastdd, each with its torch reference in the same file.

Every op takes ``impl="auto"|"triton"|"cuda"|"torch"`` (see :mod:`fastdd._backend`): ``auto`` runs
the Triton kernels on CUDA tensors and the reference elsewhere (the ridge probe, which has no kernel: its
closed form everywhere); ``FASTDD_IMPL`` replaces the default
``auto`` for a whole program (an explicit ``impl=`` wins); fp64 inputs run the reference under ``auto``
and are a ``TypeError`` on "triton" / "cuda", for every op. Ahead-of-time builds of the kernels (no GPU
needed): :mod:`fastdd.ops.aot`.

torch.compile: the references are plain torch, traced like any code; the kernel backends are
``torch.library`` custom ops (``torch.ops.fastdd.<op>`` and, for a differentiable op,
``torch.ops.fastdd.<op>_backward``, with fake implementations for shapes and ``register_autograd`` for the
backward), so a compiled graph calls them opaquely instead of tracing into the launchers. The checks that
read tensor values are skipped while compiling (``fastdd.validate.checks_enabled``); the argument checks
and the backend choice run at trace time.

- :func:`class_centers`: streaming per-class sums, counts, second moments (``ClassSums``).
- :func:`flow_matching_loss` and :func:`real_flow`: SFM's loss with its fused backward.
- :func:`ridge_probe`: CLP's batched ridge solve by Cholesky, closed-form backward.
- :func:`linear_cross_entropy`: CLP's outer cross-entropy streamed over the real features.
- :func:`linear_head_gradient`: LGM's closed-form head gradient, differentiable w.r.t. the features.
"""
from fastdd.ops.class_centers import ClassSums, class_centers, class_centers_reference, empty_class_sums
from fastdd.ops.flow_matching import flow_matching_loss, flow_matching_loss_reference, real_flow
from fastdd.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fastdd.ops.linear_head_gradient import linear_head_gradient, linear_head_gradient_reference
from fastdd.ops.ridge_probe import ridge_probe, ridge_probe_reference

__all__ = [
    "ClassSums",
    "class_centers",
    "class_centers_reference",
    "empty_class_sums",
    "flow_matching_loss",
    "flow_matching_loss_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_head_gradient",
    "linear_head_gradient_reference",
    "real_flow",
    "ridge_probe",
    "ridge_probe_reference",
]
