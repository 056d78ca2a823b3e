"""CLP, closed-form linear-probe distillation (arXiv 2605.07194), as a loss over synthetic features.

Inner problem, exact: the ridge probe fitted on the synthetic features ``Z_s [N, D]`` with targets
``Y [N, C]``,  ``W = Z_s^T (Z_s Z_s^T + lam I)^-1 Y = (Z_s^T Z_s + lam I)^-1 Z_s^T Y``
(``fastdd.ops.ridge_probe`` solves the smaller system by Cholesky and back-propagates in closed form).
Outer loss: ``L = CE(Z_r W / tau, y_r)`` averaged over the real bank rows used
(``fastdd.ops.linear_cross_entropy``, streamed over rows). Gradients reach ``Z_s`` only through ``W``.

Options (a first calibration found CLP sensitive to each; ``fastdd.distill`` passes them as ``options=``):

- ``relative_lam`` (default True): the ridge is ``lam * mean(diag(Z_s Z_s^T))`` (mean squared norm of the
  synthetic rows after normalisation, detached), so ``lam`` is scale-free; False: ``lam`` is absolute.
- ``centered_targets`` (default True): ``Y = onehot - 1/C`` instead of one-hot.
- ``feature_norm``: ``"none"`` (default, raw features: best in the calibration), ``"center"`` (subtract
  the real global mean), ``"standardize"`` (subtract it and divide by the real per-feature std) or
  ``"l2"`` (unit-norm rows). The same map is applied to real and synthetic features; centre and scale come
  from the bank (or the class sums), computed once.
- ``bias`` (default False): append a constant-1 column to both sides (a ridge-penalised bias).
- ``real_batch``: None uses the whole bank every call; an int draws that many rows of the bank (uniformly,
  with replacement, from ``generator``) per call, or uses the whole bank when it has no more rows.
- ``fit_tau`` (default False): the outer temperature is fitted every call instead of fixed, as RFAD learns
  its temperature: ``1/tau* = argmin_b CE(b Z_r W, y_r)`` over ``b`` in ``[_FIT_TAU_MIN, _FIT_TAU_MAX]``
  (a convex problem in one variable, solved by bisection on the detached logits; ``tau`` is then unused;
  False: the fixed ``tau``). Since ``tau*`` minimises the loss, the loss's
  gradient through ``tau*`` is zero (the envelope theorem): treating it as a constant gives the exact
  gradient of ``min_tau L``. It makes the loss insensitive to the overall scale of the probe's logits,
  which the feature scale and the image size move. It materialises the ``[M, C]`` logits once per call.
- ``solve_dtype``: dtype of the inner Cholesky solve (float32 or float64; None: the op's default, fp32
  unless the features are fp64).

Defaults: relative lam, centred targets, raw features: the best of a measured lam x tau sweep (lam
0.01..10, tau 0.01..0.3) and of the feature maps on Fashion-MNIST / MobileNetV2
(benchmarks/results/calibration_sweep_clp_*.md); lam 1 from ipc 10, and below it lam 2 with four
augmented copies a step through crops of [0.25, 1] of the area (``METHOD``'s defaults): the three go
together, one at a time each lost (at 1000 steps on Fashion-MNIST 32 px, against two copies, crops
[0.5, 1] and lam 1: four copies -1.8 points, crops [0.25, 1] -0.5, lam 2 -0.2, the three but lam 1
-1.3), while all three lifted the 200-step grid at ipc 1 on all six settings (+0.1 to +1.6) and
Fashion-MNIST 32 px at 1000 steps from 65.8 to 67.2 over four seeds (80.6 % of the full-data probe);
at ipc 10 the three lost (100 steps, 32 px: -0.5 on Fashion-MNIST, -3.8 on MNIST-5k), so from ipc 10
the four copies go with the loop's crops and lam 1 (+0.4 to +2.6 over two copies on the grid); the fixed
tau 0.1 over the fitted one (``fit_tau``) from the grid of data sets and image sizes
(benchmarks/results/calibration_grid*.md): with one augmented copy a step the fitted temperature was
ahead on three of four settings, with two copies the fixed one is ahead on every setting measured.
2,048 bank rows a step over 4,096: within 0.5 points at ipc 1 on all six settings of the grid and at
1000 steps (66.3 against 66.2 on Fashion-MNIST 32 px, seeds 0 and 1), within 0.9 at ipc 10 (at 1000
steps on Fashion-MNIST 32 px: 75.7 against 76.3, 1 seed), at half the loss's cost (both measured with
the ipc-1 default before the current one). The paper's values are not public.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.linear_cross_entropy import linear_logits
from .base import LOOP_DEFAULTS, ByIpc, Context, Method, Objective, Option, RealNeeds, Recipe, parse_bool, \
    parse_optional_int
from ..validate import checks_enabled, features as check_features, positive_float, positive_int
from ..validate import shown

__all__ = ["ClosedFormProbeLoss", "FEATURE_NORMS", "METHOD"]

FEATURE_NORMS = ("none", "center", "standardize", "l2")
_STAT_CHUNK = 65536
_FIT_TAU_BISECTIONS = 20  # halvings of the fitted log(1/tau)'s range: 16.1 / 2^20, a relative 1.5e-5 in 1/tau
# (the loss is flat at its minimum: an error eps in 1/tau moves it by O(eps^2))
_LOGIT_FLOOR = 80.0  # as the linear cross-entropy's reference: no float32 denormals in the softmax
_FIT_TAU_MIN, _FIT_TAU_MAX = 1e-3, 1e4  # bounds of the fitted 1/tau (the logits of a ridge probe on centred
# targets are O(1): its fitted 1/tau lies far inside them)


def _logits(zr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``zr @ w`` in the dtype the linear cross-entropy op would use (fp64 when the probe is)."""
    return linear_logits(zr, w, torch.promote_types(zr.dtype, w.dtype))


def _fitted_inverse_temperature(logits: torch.Tensor, y: torch.Tensor) -> tuple:
    """``(b, top)``: the ``b`` in ``[_FIT_TAU_MIN, _FIT_TAU_MAX]`` minimising ``mean CE(b s, y)`` for the
    detached temperature-1 logits ``s [M, C]`` and labels ``y [M, 1]`` (a 0-d tensor, no host sync), and
    the rows' max ``top [M, 1]`` (the max of ``b s`` is ``b top``: ``b > 0``). The loss is convex in ``b``,
    so its derivative ``mean(E_softmax(b s)[s] - s_y)`` rises with ``b`` and bisection on its sign, in log
    space, finds the minimum (a bound when the derivative keeps one sign: real rows the probe separates
    perfectly give the upper one). The rows' sums are matrix-vector products (a reduction over rows of 10
    is several times slower on a CPU) and the exponents are floored at -80 (float32 denormals are slow on
    a CPU and weigh under e^-80)."""
    with torch.no_grad():
        top = logits.amax(1, keepdim=True)
        shifted = logits - top
        ones = shifted.new_ones(shifted.shape[1])
        true_total = shifted.gather(1, y).sum()
        lo = torch.full((), math.log(_FIT_TAU_MIN), dtype=shifted.dtype, device=shifted.device)
        hi = torch.full((), math.log(_FIT_TAU_MAX), dtype=shifted.dtype, device=shifted.device)
        for _ in range(_FIT_TAU_BISECTIONS):
            mid = 0.5 * (lo + hi)
            e = (shifted * mid.exp()).clamp_(min=-_LOGIT_FLOOR).exp_()
            rising = ((e * shifted).matmul(ones) / e.matmul(ones)).sum() > true_total
            lo, hi = torch.where(rising, lo, mid), torch.where(rising, mid, hi)
        return (0.5 * (lo + hi)).exp(), top


class ClosedFormProbeLoss(nn.Module):
    """``ClosedFormProbeLoss(stats, lam, tau, real_batch=None)(zs, ys) -> CE(Z_r W(zs) / tau, y_r)``.

    Args:
        stats: a ``fastdd.RealStats`` with a feature bank (``bank=True``).
        lam: ridge strength (relative to the kernel's mean diagonal when ``relative_lam``).
        tau: softmax temperature of the outer cross-entropy (unused with ``fit_tau=True``, which fits it every call).
        real_batch: None (whole bank per call) or the number of bank rows drawn per call.
        relative_lam, centered_targets, feature_norm, bias, fit_tau, solve_dtype: see the module docstring.
        generator: ``torch.Generator`` (CPU) drawing the real batches (``torch.compile(fullgraph=True)``
            cannot trace one: None draws from the global RNG).
        cache_bank: keep the bank on the features' device after the first call (the whole bank used:
            normalised, float32; drawn rows: in its stored dtype); False gathers the rows from the
            (possibly memory-mapped) bank where the stats keep it, every call.

    With ``cache_bank`` the bank is held in the non-persistent buffers ``bank_features`` and
    ``bank_labels``: ``.to(device)`` moves it with the module, and ``state_dict()`` leaves it out (it is
    the statistics' data, possibly memory-mapped and as large as the real set; the loss is rebuilt from
    them). They start as the statistics' own tensors (no copy) and become the device copy at the first
    call. ``feature_shift`` / ``feature_scale`` are ordinary buffers. Without ``cache_bank`` the bank is a
    plain attribute that ``.to()`` does not move.
    """

    def __init__(self, stats, lam: float = 1.0, tau: float = 0.1, real_batch: Optional[int] = None, *,
                 relative_lam: bool = True, centered_targets: bool = True, feature_norm: str = "none",
                 bias: bool = False, fit_tau: bool = False, solve_dtype: Optional[torch.dtype] = None,
                 generator: Optional[torch.Generator] = None, cache_bank: bool = True):
        super().__init__()
        if not getattr(stats, "has_bank", False):
            raise ValueError("ClosedFormProbeLoss needs stats with a feature bank: build them with "
                             "RealStats.from_data(..., bank=True) or RealStats.from_features(..., bank=True)")
        lam = positive_float("lam", lam)  # inf: W = 0 and a constant loss; NaN: NaN every step
        tau = positive_float("tau", tau)
        n_bank = stats.bank_features.shape[0]
        if n_bank == 0:
            raise ValueError("stats: the feature bank is empty")
        if real_batch is not None and (isinstance(real_batch, bool) or not isinstance(real_batch, int)
                                       or real_batch < 1):
            raise ValueError(f"real_batch must be None or a positive int, got {shown(real_batch)}")
        if feature_norm is None:
            feature_norm = "none"
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {shown(feature_norm)}")
        if solve_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be None, torch.float32 or torch.float64, got {shown(solve_dtype)}")
        stats.require_nonempty("ClosedFormProbeLoss(stats)")
        self.stats = stats
        self.num_classes = stats.num_classes
        self.lam = lam
        self.tau = tau
        self.real_batch = real_batch
        self.relative_lam = bool(relative_lam)
        self.centered_targets = bool(centered_targets)
        self.feature_norm = feature_norm
        self.bias = bool(bias)
        self.fit_tau = bool(fit_tau)
        self.solve_dtype = solve_dtype
        self.generator = generator
        self.cache_bank = bool(cache_bank)
        if self.cache_bank:
            self.register_buffer("bank_features", stats.bank_features, persistent=False)
            self.register_buffer("bank_labels", stats.bank_labels, persistent=False)
        else:
            self.bank_features, self.bank_labels = stats.bank_features, stats.bank_labels
        self._bank_normalized = False  # the bank buffers hold the normalised float32 bank
        shift = scale = None
        if feature_norm in ("center", "standardize"):
            shift, scale = _bank_mean_std(stats.bank_features)
            if feature_norm == "center":
                scale = None
        self.register_buffer("feature_shift", shift)
        self.register_buffer("feature_scale", scale)

    # ---- pieces ------------------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """The feature map applied to both sides (normalisation, then the optional bias column)."""
        if self.feature_shift is not None:
            z = z - self.feature_shift.to(z.device, z.dtype)
        if self.feature_scale is not None:
            z = z / self.feature_scale.to(z.device, z.dtype)
        if self.feature_norm == "l2":
            z = F.normalize(z, dim=1)
        if self.bias:
            z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
        return z

    def targets(self, ys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = F.one_hot(ys.long(), self.num_classes).to(dtype)
        return y - 1.0 / self.num_classes if self.centered_targets else y

    def ridge_strength(self, zs: torch.Tensor):
        """Absolute ridge: ``lam``, or ``lam * mean_i ||z_i||^2`` (a detached 0-d tensor, no host sync)
        when ``relative_lam``."""
        if not self.relative_lam:
            return self.lam
        # at least fp32: squared norms of fp16 features overflow fp16 (|z| ~ 100 and D ~ 10 suffice)
        z = zs.detach().to(torch.promote_types(zs.dtype, torch.float32))
        return self.lam * z.pow(2).sum(1).mean().clamp(min=torch.finfo(z.dtype).tiny)

    def probe(self, zs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The ridge probe ``W [D(+1), C]`` fitted on ``zs`` (already normalised), in the solve dtype."""
        return ops.ridge_probe(zs, self.targets(ys, zs.dtype), self.ridge_strength(zs), solve_dtype=self.solve_dtype)

    def real_features(self, device) -> tuple:
        """The real rows used this call, normalised: ``(zr [M, D(+1)] float32 on device, yr [M])``.

        With the whole bank in use (``real_batch`` None or >= its rows) and ``cache_bank``, the normalised
        float32 bank is computed once (at the first call) into the bank buffers and moved with them;
        otherwise the drawn rows are gathered (``index_select``, from the buffers' device copy in the
        stored dtype, or from the bank where the stats keep it) and converted and normalised per call: a
        float32 copy of a drawn bank would save about 0.2 ms a step on a CPU (2,048 rows) for twice the
        bank's memory (fp16)."""
        device = torch.device(device)
        rows = self.bank_features.shape[0]
        whole = self.real_batch is None or self.real_batch >= rows
        if self.cache_bank and (self.bank_features.device != device or whole and not self._bank_normalized):
            bank = self.bank_features.to(device)
            if whole and not self._bank_normalized:
                bank = self.normalize(bank.float())
                self._bank_normalized = True
            self.bank_features, self.bank_labels = bank, self.bank_labels.to(device)
        bank, labels = self.bank_features, self.bank_labels
        if whole:
            zr = bank if self._bank_normalized else self.normalize(bank.to(device).float())
            return zr, labels.to(device)
        idx = torch.randint(rows, (self.real_batch,), generator=self.generator).to(bank.device)
        zr, yr = torch.index_select(bank, 0, idx).to(device), torch.index_select(labels, 0, idx).to(device)
        return self.normalize(zr.float()), yr

    # ---- the loss ----------------------------------------------------------------------------------
    def forward(self, zs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        # labels and NaN/Inf first: the ridge strength of NaN features would be reported as a bad lam
        check_features(zs, ys, dim=self.stats.feature_dim, num_classes=self.num_classes)
        if checks_enabled():  # a class without a row: the probe's target column for it holds no signal
            missing = torch.nonzero(torch.bincount(ys.long(), minlength=self.num_classes) == 0).flatten().tolist()
            if missing:
                raise ValueError(f"ys must hold every class 0..{self.num_classes - 1} of the statistics at least "
                                 f"once (the ridge probe needs a row of each); missing classes {missing[:10]}"
                                 f"{'...' if len(missing) > 10 else ''}")
        w = self.probe(self.normalize(zs), ys)
        zr, yr = self.real_features(zs.device)
        # zr stays float32 (the op promotes W's dtype itself): casting the bank to an fp64 W would copy it
        # whole and push the op onto its reference path, which materialises the logits
        if self.fit_tau:
            return self.fitted_cross_entropy(_logits(zr, w), yr)
        return ops.linear_cross_entropy(zr, yr, w, tau=self.tau)

    def fitted_cross_entropy(self, logits: torch.Tensor, yr: torch.Tensor) -> torch.Tensor:
        """``min_b CE(b * logits, yr)``: the cross-entropy of the temperature-1 ``logits [M, C]`` at their
        fitted inverse temperature ``b = 1/tau*``, a constant of the graph (exact: see the module docstring).
        The logits are computed once, for the fit and the loss (the fused op would compute them again), and
        the softmax is written out: torch's log-softmax over rows of C = 10 is several times slower on a
        CPU. Exponents are floored at -80 as in the linear cross-entropy's reference (no float32 denormals;
        the target logit is left as it is)."""
        y = yr.long().view(-1, 1)
        b, top = _fitted_inverse_temperature(logits.detach(), y)
        shifted = (logits - top) * b
        lse = shifted.clamp(min=-_LOGIT_FLOOR).exp().matmul(shifted.new_ones(shifted.shape[1])).log()
        return (lse - shifted.gather(1, y).squeeze(1)).mean()

    def fitted_inverse_temperature(self, zr: torch.Tensor, yr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``1/tau*`` for the real rows ``zr`` and the probe ``w``: the inverse temperature minimising
        ``CE(b zr w, yr)`` over ``b`` in ``[_FIT_TAU_MIN, _FIT_TAU_MAX]`` (a detached 0-d tensor), as the
        loss fits it."""
        with torch.no_grad():
            return _fitted_inverse_temperature(_logits(zr, w), yr.long().view(-1, 1))[0]

    def settings(self) -> dict:
        return {"lam": self.lam, "tau": self.tau, "real_batch": self.real_batch,
                "relative_lam": self.relative_lam, "centered_targets": self.centered_targets,
                "feature_norm": self.feature_norm, "bias": self.bias, "fit_tau": self.fit_tau,
                "solve_dtype": None if self.solve_dtype is None else str(self.solve_dtype)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items())


def _bank_mean_std(bank: torch.Tensor):
    """Per-feature mean and std (fp64 accumulation, returned float32) of the bank, chunk by chunk."""
    total = torch.zeros(bank.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(bank.shape[1], dtype=torch.float64)
    for start in range(0, bank.shape[0], _STAT_CHUNK):
        chunk = bank[start:start + _STAT_CHUNK].to("cpu", torch.float64)
        total += chunk.sum(0)
        total_sq += chunk.pow(2).sum(0)
    n = bank.shape[0]
    mean = total / n
    var = (total_sq / n - mean.pow(2)).clamp(min=0)
    return mean.float(), var.sqrt().clamp(min=1e-6).float()


# the crop law of CLP's default augmentation: the area's [0.25, 1] below ipc 10, the loop's [0.5, 1] from it
_BELOW_IPC_10 = ByIpc(((1, (0.25, 1.0)), (10, LOOP_DEFAULTS["crop_scale"])))


def _build(context: Context, options: dict) -> Objective:
    return Objective(ClosedFormProbeLoss(context.stats, generator=context.cpu_generator, **options))


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")
    return value


METHOD = Method(
    name="clp", title="closed-form linear-probe distillation (arXiv 2605.07194)",
    matches="an exact ridge probe on the synthetic features, scored by cross-entropy on a real feature bank",
    real_per_step="none", build=_build, needs=RealNeeds(bank=True),
    # Four augmented copies a step (twice the loop's two: twice the step's encoder rows), with, below ipc 10,
    # crops of [0.25, 1] of the area and lam 2 (see the module docstring: the three go together; ipcs 2 to 9
    # are unmeasured and take ipc 1's), and from ipc 10 the loop's crops [0.5, 1] and lam 1
    # (benchmarks/results/calibration_grid*.md).
    defaults=dict(LOOP_DEFAULTS, copies=4, crop_scale=_BELOW_IPC_10),
    options={
        "lam": Option(ByIpc(((1, 2.0), (10, 1.0))),
                      "ridge strength (relative to the kernel's mean diagonal when relative_lam)",
                      positive_float),
        "tau": Option(0.1, "temperature of the outer cross-entropy", positive_float),
        "real_batch": Option(2048, "bank rows drawn per step (None or 'all': the whole bank)",
                             lambda n, v: positive_int(n, v, allow_none=True), parse=parse_optional_int),
        "relative_lam": Option(True, "lam relative to mean(diag(Z_s Z_s^T)) (False: absolute)", _flag,
                               parse=parse_bool),
        "centered_targets": Option(True, "targets onehot - 1/C (False: one-hot)", _flag, parse=parse_bool),
        "feature_norm": Option("none", "feature map of both sides", choices=FEATURE_NORMS),
        "bias": Option(False, "append a constant-1 column (a ridge-penalised bias)", _flag, parse=parse_bool),
        "fit_tau": Option(False, "fit the temperature every step (1/tau* minimising the loss; tau unused)",
                          _flag, parse=parse_bool),
    },
    recipes={"paper": Recipe(
        source="arXiv 2605.07194 (its abstract): the exact ridge probe with the temperature-scaled "
               "cross-entropy outer loss (the method itself); one synthetic pass per step (docs/methods.md)",
        values=dict(copies=1),
        not_public=("lam", "tau", "steps", "lr", "init", "parameterization", "augmentation chain",
                    "image size and crop", "autocast"))})
