"""The linear-probe evaluation protocol, its real-image baselines, and SFM's classifier inheritance.

Protocol (docs/methods.md, "The probe protocol"), the same for every method and baseline:

- a fresh linear probe ``z -> z W + b`` on the features of the frozen encoder, initialised as in LGM's
  evaluator, ``W ~ N(0, 0.01^2)`` and ``b = 0``, drawn from the probe seed (``head_init="lgm"``, the
  default; ``"uniform"`` is ``nn.Linear``'s U(-1/sqrt(D), 1/sqrt(D)));
- trained on the N given images for ``epochs`` epochs with Adam, ``lr = 1e-3 * bs / 256``,
  ``bs = min(100, N)``, a cosine schedule over all steps (to 0, stepped once per batch), mini-batches
  reshuffled every epoch (the last one may be smaller);
- every epoch sees each image through a fresh flip + random resized crop (``fastdd.augment.Augment
  .evaluation()``: flip p=0.5, crop area U[0.08, 1], log aspect ratio U[log 3/4, log 4/3], output at the
  image's own size);
- top-1 accuracy (%) on the real test set, encoded once un-augmented (the test images are already resized
  and centre-cropped by the data loader; the encoder wrapper resizes to its input size);
- repeated for each probe seed; ``ProbeResult`` holds the mean, the sample standard deviation (ddof 1) and
  every seed's accuracy.

Speed: the encoder is frozen and the probe is linear, so training needs only the features of the
augmented views. With ``views=None`` every epoch re-encodes freshly augmented images (the protocol to the
letter: ``epochs * N`` encoder calls per seed). With ``views=V`` (the default) each seed first encodes a pool
of V independently augmented views of every image, and each epoch shows every image through one of its
views drawn uniformly at random: every view is still a fresh flip + crop of the protocol's law, but
``epochs / V`` epochs reuse a view on average. The encoder cost drops from ``epochs * N`` to ``V * N``
images per seed. Measured against ``views=None`` (``scripts/calibrate.py --mode views``,
``benchmarks/results/calibration_views.md``: Fashion-MNIST 32 px, MobileNetV2, 3 random-real draws at
ipc 1 x 3 probe seeds): 33.2 +- 2.8 % re-encoding every epoch, 32.6 +- 3.9 with 10 views, 35.2 +- 3.7 with
30, 36.4 +- 4.0 with 100 (one draw with 1000 views: 36.1 vs 36.0 re-encoded). A pool can read a few points
higher than the letter of the protocol; compare sets only under one setting of ``views``. Each seed draws
its own pool, its probe initialisation and its batch order from ``torch.Generator().manual_seed(seed)``, so
a seed's accuracy does not depend on which other seeds run with it.

Baselines (each returns an ``(images, labels)`` pair, class-major, to pass to ``evaluate``):
``random_real`` (ipc random real images per class), ``class_centroids`` (the real image nearest each class
mean in feature space; k-means centres within each class for ipc > 1), the coresets ``kcenter_greedy``
(farthest-point picks from the image nearest the class mean) and ``herding`` (greedy matching of the class
mean), which recent work finds competitive with distilled sets on ImageNet, ``nearest_real`` (the real image of
the same class nearest each distilled image in feature space). ``full_data_probe`` trains the same probe
on the whole real training set as the ceiling (on precomputed, un-augmented features: see its docstring).

``classifier_inheritance`` is SFM's evaluation: a head trained once on the full real set's features of the
distillation encoder, a projector between the evaluation and distillation feature spaces fitted on the
synthetic images only, predictions ``head(P(phi_e(x)))``.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .augment import CROP_SCALE, Augment
from .encoders import encoder_device, resolve_encoder
from .validate import class_labels, finite, one_of, positive_float, positive_int, shown
from .validate import seed as check_seed

__all__ = ["ProbeResult", "evaluate", "encode", "fit_linear_head", "full_data_probe", "random_real",
           "class_centroids", "kcenter_greedy", "herding", "nearest_real", "classifier_inheritance",
           "DEFAULT_EPOCHS", "DEFAULT_VIEWS", "DEFAULT_SEEDS", "HEAD_INITS"]

DEFAULT_EPOCHS = 1000
DEFAULT_VIEWS = 100
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_FULL_DATA_EPOCHS = 30
HEAD_INITS = ("lgm", "uniform")  # the probe's initialisation: LGM's evaluator (the default), nn.Linear's
LGM_HEAD_STD = 0.01
MAX_BATCH_SIZE = 100
_ENCODE_BATCH = 256
_RANGE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """Top-1 accuracies (%) of one evaluation, one per probe seed.

    ``mean`` and ``std`` (sample standard deviation, ddof 1; 0 for a single run) summarise ``accuracies``;
    ``seeds`` are the probe seeds in the same order; ``settings`` records the protocol's parameters;
    ``heads`` holds the trained probes as ``nn.Linear`` modules (one per seed).
    """

    mean: float
    std: float
    accuracies: List[float]
    seeds: List[int]
    settings: dict = field(default_factory=dict)
    heads: List[nn.Linear] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_accuracies(cls, accuracies: Sequence[float], seeds: Sequence[int], settings: dict,
                        heads: Sequence[nn.Linear] = ()) -> "ProbeResult":
        accs = [float(a) for a in accuracies]
        if not accs:
            raise ValueError("accuracies must not be empty")
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return cls(statistics.fmean(accs), std, accs, list(seeds), dict(settings), list(heads))

    @classmethod
    def combine(cls, results: Sequence["ProbeResult"]) -> "ProbeResult":
        """Pool several results (e.g. one per distillation seed) into one: mean and std over all runs.

        ``seeds`` lists each run's probe seed; ``settings`` are the first result's plus ``runs``."""
        results = list(results)
        if not results:
            raise ValueError("results must not be empty")
        accs = [a for r in results for a in r.accuracies]
        seeds = [s for r in results for s in r.seeds]
        settings = dict(results[0].settings, runs=len(results))
        return cls.from_accuracies(accs, seeds, settings, [h for r in results for h in r.heads])

    def __str__(self) -> str:
        return f"{self.mean:.1f} +- {self.std:.1f} ({len(self.accuracies)} runs)"


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------

def _check_images(images, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [N, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [0, 1], got {images.dtype}")
    finite(name, images)
    lo, hi = float(images.min()), float(images.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{name} must have values in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return images


def _check_set(images, labels, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    images = _check_images(images, f"{name} images")
    return images, class_labels(f"{name} labels", labels, images.shape[0])


def _unpack_distilled(distilled) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(distilled, (str, os.PathLike)):  # a file or folder in any format fastdd.export reads
        from .export import load

        distilled = load(distilled)
    if hasattr(distilled, "images") and hasattr(distilled, "labels"):
        return distilled.images, distilled.labels
    if isinstance(distilled, (tuple, list)) and len(distilled) == 2:
        return distilled[0], distilled[1]
    raise TypeError("distilled must be a DistilledSet (with .images and .labels) or an (images, labels) "
                    f"pair, got {type(distilled).__name__}")


def _check_seeds(seeds) -> List[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = (seeds,)
    try:
        seeds = list(seeds)
    except TypeError:
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}") from None
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints, got []")
    seeds = [check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {shown(seeds)}")
    return seeds


def _check_features(features, n: int, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != n:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a tensor [{n}, D] (one row per image), got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {features.dtype}")
    finite(name, features)
    return features.float()


def _test_features(encoder, train_images: torch.Tensor, test_images: torch.Tensor,
                   test_features: Optional[torch.Tensor], progress: bool) -> torch.Tensor:
    """The test set's features: encoded now, or the given ones checked (one row per test image, the
    encoder's width, found from one training image) so a mismatch is not a matmul error later."""
    if test_features is None:
        return encode(encoder, test_images, progress=progress, desc="test features")
    test_features = _check_features(test_features, test_images.shape[0], "test_features")
    dim = encode(encoder, train_images[:1]).shape[1]
    if test_features.shape[1] != dim:
        raise ValueError(f"test_features have {test_features.shape[1]} features per image, the encoder gives {dim}")
    return test_features


def _check_same_geometry(encoder, train_images: torch.Tensor, test_images: torch.Tensor) -> None:
    """A convolutional encoder without its own resize sees different resolutions as different inputs."""
    if getattr(encoder, "input_size", None) is None and train_images.shape[-2:] != test_images.shape[-2:]:
        raise ValueError(f"distilled images are {tuple(train_images.shape[-2:])} but test images are "
                         f"{tuple(test_images.shape[-2:])} and the encoder does not resize its inputs: "
                         "load both at one size or give the encoder an input_size")


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------

def encode(encoder, images: torch.Tensor, batch_size: int = _ENCODE_BATCH, progress: bool = False,
           desc: str = "encoding") -> torch.Tensor:
    """Features ``[N, D]`` float32 on the CPU of ``images [N,3,H,W]`` (no graph, in chunks)."""
    from tqdm.auto import tqdm

    encoder = resolve_encoder(encoder)
    device = encoder_device(encoder)
    chunks = []
    with torch.no_grad(), tqdm(total=images.shape[0], desc=desc, unit="img", disable=not progress,
                               leave=False) as bar:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device, torch.float32)
            feats = encoder(batch)
            if feats.dim() != 2 or feats.shape[0] != batch.shape[0]:
                raise ValueError(f"encoder must return features [B, D]; got {tuple(feats.shape)} for "
                                 f"{batch.shape[0]} images")
            chunks.append(feats.float().cpu())
            bar.update(batch.shape[0])
    features = torch.cat(chunks)
    finite(f"the encoder's features ({desc})", features)
    return features


def _augmented_features(encoder, images: torch.Tensor, augment: Augment, copies: int,
                        generator: torch.Generator, progress: bool = False,
                        desc: str = "augmented views") -> torch.Tensor:
    """``[copies, N, D]``: features of ``copies`` fresh augmentations of every image.

    Augmentations are drawn on the CPU from ``generator`` (reproducible across devices), one view
    (all N images) at a time, and encoded in chunks of whole views."""
    n = images.shape[0]
    views_per_chunk = max(1, _ENCODE_BATCH // n)
    out = []
    from tqdm.auto import tqdm
    with tqdm(total=copies, desc=desc, unit="view", disable=not progress, leave=False) as bar:
        for start in range(0, copies, views_per_chunk):
            k = min(views_per_chunk, copies - start)
            batch = torch.cat([augment(images, generator) for _ in range(k)])
            out.append(encode(encoder, batch.clamp_(0.0, 1.0)).view(k, n, -1))
            bar.update(k)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Probe training (the shared core)
# --------------------------------------------------------------------------------------------------

def _default_lr(batch_size: int) -> float:
    return 1e-3 * batch_size / 256


def _initial_probes(generators: Sequence[torch.Generator], dim: int, num_classes: int, device: torch.device,
                    head_init: str = "lgm") -> Tuple[torch.Tensor, torch.Tensor]:
    """``W [S, D, C]`` and ``b [S, C]``, probe s drawn from ``generators[s]``.

    ``head_init="lgm"`` (the default, LGM's evaluator): ``W ~ N(0, 0.01^2)``, ``b = 0``; the weight is drawn
    in ``nn.Linear``'s ``[C, D]`` layout (``nn.Linear(D, C).weight.normal_(0, 0.01, generator=g)`` gives the
    same numbers) and transposed. ``"uniform"``: ``nn.Linear``'s own U(-1/sqrt(D), 1/sqrt(D)) for both, in
    ``[D, C]`` layout, the weight first (the probe's initialisation before LGM's became the default)."""
    one_of("head_init", head_init, HEAD_INITS)
    weights, biases = [], []
    for g in generators:
        if head_init == "lgm":
            weights.append(torch.empty(num_classes, dim).normal_(0.0, LGM_HEAD_STD, generator=g).t())
            biases.append(torch.zeros(num_classes))
        else:
            bound = 1.0 / math.sqrt(dim)
            weights.append(torch.empty(dim, num_classes).uniform_(-bound, bound, generator=g))
            biases.append(torch.empty(num_classes).uniform_(-bound, bound, generator=g))
    return torch.stack(weights).to(device), torch.stack(biases).to(device)


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The protocol's schedule ``lr_k = lr (1 + cos(pi k / T)) / 2`` at step k = 0 .. T - 1 (stepped once per
    batch). The closed form of ``CosineAnnealingLR(T_max=T)``; ``LambdaLR`` evaluates it as written, while
    ``CosineAnnealingLR`` updates the rate recursively (off by up to ~1e-14 relative over 18,000 steps)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))


def _cross_entropy_gradients(z: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of the mean cross-entropy of S linear probes on their batches ``z [S, B, D]``
    with ``labels [S, B]``: ``dW = Z^T (softmax(ZW + b) - Y) / B`` ``[S, D, C]`` and
    ``db = colsum(softmax - Y) / B`` ``[S, C]`` (``fastdd.ops.linear_head_gradient``, batched over S)."""
    residual = torch.baddbmm(bias.unsqueeze(1), z, weight).softmax(-1)
    residual.scatter_add_(2, labels.unsqueeze(-1), residual.new_full((*labels.shape, 1), -1.0))
    residual /= labels.shape[1]
    return torch.bmm(z.transpose(1, 2), residual), residual.sum(1)


def _train_probes(epoch_features: Callable[[int], torch.Tensor], labels: torch.Tensor, num_classes: int,
                  generators: Sequence[torch.Generator], epochs: int, batch_size: int, lr: float,
                  progress: bool, desc: str, head_init: str = "lgm") -> Tuple[torch.Tensor, torch.Tensor]:
    """Train one linear probe per generator, all at once, and return ``W [S,D,C]``, ``b [S,C]``.

    ``epoch_features(epoch)`` returns the features ``[S, N, D]`` (or ``[N, D]``, shared) that epoch
    trains on. Probe s is initialised by ``head_init`` (``_initial_probes``) and shuffles its batches every
    epoch from ``generators[s]``. The S probes are stacked into one ``torch.optim.Adam``
    (betas 0.9, 0.999, eps 1e-8, no weight decay): Adam is element-wise, so this is S independent
    trainings. The gradient is taken in closed form (``_cross_entropy_gradients``) and handed to the
    optimiser as ``.grad``: no autograd graph per step, which matters for 18,000-step full-data probes.
    """
    from tqdm.auto import tqdm

    probe_count, n = len(generators), labels.shape[0]
    first = epoch_features(0)
    dim, device = first.shape[-1], first.device
    weight, bias = _initial_probes(generators, dim, num_classes, device, head_init)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    schedule = _cosine_schedule(optimizer, epochs * math.ceil(n / batch_size))
    labels = labels.to(device)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        feats = first if epoch == 0 else epoch_features(epoch)
        if feats.dim() == 2:
            feats = feats.unsqueeze(0).expand(probe_count, -1, -1)
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]
            z = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, dim))
            weight.grad, bias.grad = _cross_entropy_gradients(z, labels[idx], weight, bias)
            optimizer.step()
            schedule.step()
    return weight, bias


def _accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
              chunk: int = 8192) -> float:
    correct = 0
    weight, bias = weight.to(features.device), bias.to(features.device)
    for start in range(0, features.shape[0], chunk):
        pred = (features[start:start + chunk] @ weight + bias).argmax(1)
        correct += int((pred == labels[start:start + chunk].to(pred.device)).sum())
    return 100.0 * correct / features.shape[0]


def _as_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        head.weight.copy_(weight.t())
        head.bias.copy_(bias)
    return head.requires_grad_(False)


def _probe_settings(n: int, epochs: int, batch_size: int, lr: float, head_init: str) -> dict:
    return {"protocol": "linear probe, Adam, cosine schedule, top-1 on the real test set",
            "train_images": n, "epochs": epochs, "batch_size": batch_size, "lr": lr, "head_init": head_init}


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------

def _test_set(test_images, test_labels) -> Tuple[torch.Tensor, torch.Tensor]:
    """The test set as tensors, from the same kinds of source as ``distill`` takes: images ``[M,3,H,W]``
    in [0,1] with ``test_labels``, uint8 or one-channel images, a ``fastdd.data.Split``, a map-style
    Dataset or a DataLoader (read once through ``fastdd.data.iterate_batches``, which validates them)."""
    from .data import Split, iterate_batches

    if isinstance(test_images, Split):
        if test_labels is not None:
            raise ValueError("test_labels is not used with a fastdd.data.Split: it holds its own labels")
        test_images, test_labels = test_images.images, test_images.labels
    if isinstance(test_images, torch.Tensor) and test_images.is_floating_point() and test_images.dim() == 4 \
            and test_images.shape[1] == 3:
        return test_images, test_labels  # the common case: checked as it is, no copy
    if isinstance(test_images, torch.Tensor) and test_labels is None:
        raise ValueError("test_labels is required when test_images is a tensor")
    batches = list(iterate_batches(test_images, test_labels))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def evaluate(distilled, encoder, test_images, test_labels: Optional[torch.Tensor] = None, *,
             epochs: int = DEFAULT_EPOCHS, seeds: Sequence[int] = DEFAULT_SEEDS,
             views: Optional[int] = DEFAULT_VIEWS, batch_size: Optional[int] = None,
             lr: Optional[float] = None, crop_scale: Sequence[float] = CROP_SCALE,
             num_classes: Optional[int] = None, test_features: Optional[torch.Tensor] = None,
             head_init: str = "lgm", progress: bool = True) -> ProbeResult:
    """Train a fresh linear probe on ``distilled`` and report its top-1 accuracy (%) on the test set.

    Args:
        distilled: a ``DistilledSet`` (``.images``, ``.labels``), an ``(images, labels)`` pair (images
            ``[N,3,H,W]`` in [0,1], integer labels ``[N]``), or the path of a set in any format
            ``fastdd.export.load`` reads (fastdd's, LGM's data.pth, DC-Bench's, an ImageFolder).
        encoder: the frozen encoder (a ``FrozenEncoder``, any nn.Module, or a name for
            ``fastdd.encoders.load``); the probe runs on its features.
        test_images, test_labels: the real test set: images ``[M,3,H,W]`` in [0,1] (uint8 and one
            channel too) with labels ``[M]``, or a ``fastdd.data.Split``, Dataset or DataLoader (labels
            None); each of its classes needs distilled images.
        epochs: passes over the N images (one step per epoch when N <= 100).
        seeds: probe seeds; each trains one probe (initialisation, augmentation, batch order).
        views: augmented views encoded per image and seed (see the module docstring); None re-encodes
            fresh augmentations every epoch.
        batch_size: default ``min(100, N)``. lr: default ``1e-3 * batch_size / 256``.
        crop_scale: the random resized crop's area range (the protocol's (0.08, 1) by default).
        num_classes: C (default: 1 + the largest label of either set).
        test_features: the test set's features ``[M, D]`` when already computed (they are reused, e.g.
            across many evaluations; the test images are then only checked).
        head_init: the probe's initialisation, ``"lgm"`` (LGM's evaluator: ``W ~ N(0, 0.01^2)``, ``b = 0``)
            or ``"uniform"`` (``nn.Linear``'s default).
        progress: tqdm progress bars.

    Returns:
        ``ProbeResult`` with the per-seed accuracies, their mean and std, and the settings.
    """
    images, labels = _check_set(*_unpack_distilled(distilled), "distilled")
    test_images, test_labels = _check_set(*_test_set(test_images, test_labels), "test")
    epochs = positive_int("epochs", epochs)
    head_init = one_of("head_init", head_init, HEAD_INITS)
    views = positive_int("views", views, allow_none=True)
    seeds = _check_seeds(seeds)
    n = images.shape[0]
    batch_size = positive_int("batch_size", batch_size, allow_none=True) or min(MAX_BATCH_SIZE, n)
    lr = _default_lr(batch_size) if lr is None else positive_float("lr", lr)
    if num_classes is None:
        num_classes = 1 + max(int(labels.max()), int(test_labels.max()))
    else:
        num_classes = positive_int("num_classes", num_classes)
        labels = class_labels("distilled labels", labels, n, num_classes)
        test_labels = class_labels("test labels", test_labels, test_labels.shape[0], num_classes)
    missing = sorted(set(test_labels.unique().tolist()) - set(labels.unique().tolist()))
    if missing:  # the probe never sees them: every such test image counts as an error, silently
        raise ValueError(f"test_labels hold classes {missing[:10]}{'...' if len(missing) > 10 else ''} that "
                         "the distilled set has no image of: evaluate on the distilled classes only")
    encoder = resolve_encoder(encoder)
    _check_same_geometry(encoder, images, test_images)
    test_features = _test_features(encoder, images, test_images, test_features, progress)

    augment = Augment.evaluation(crop_scale=crop_scale)
    device = encoder_device(encoder)
    images = images.detach().to(device, torch.float32)
    accuracies, heads = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if views is None:
            def epoch_features(epoch, g=generator):
                return _augmented_features(encoder, images, augment, 1, g)
        else:
            pool = _augmented_features(encoder, images, augment, views, generator, progress,
                                       desc=f"probe seed {seed}: views")

            def epoch_features(epoch, g=generator, pool=pool):
                pick = torch.randint(views, (n,), generator=g)
                return pool[pick, torch.arange(n)].unsqueeze(0)
        weight, bias = _train_probes(epoch_features, labels, num_classes, [generator], epochs, batch_size,
                                     lr, progress, desc=f"probe seed {seed}", head_init=head_init)
        accuracies.append(_accuracy(weight[0], bias[0], test_features, test_labels))
        heads.append(_as_linear(weight[0], bias[0]))
    settings = _probe_settings(n, epochs, batch_size, lr, head_init)
    settings.update(views=views, augmentation=augment.settings(), encoder=getattr(encoder, "name", None),
                    image_size=list(images.shape[-2:]), num_classes=num_classes, test_images=test_images.shape[0])
    return ProbeResult.from_accuracies(accuracies, seeds, settings, heads)


# --------------------------------------------------------------------------------------------------
# Full-data probe (ceiling) and heads
# --------------------------------------------------------------------------------------------------

def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None, *,
                    epochs: int = DEFAULT_FULL_DATA_EPOCHS, seed: int = 0, batch_size: int = MAX_BATCH_SIZE,
                    lr: Optional[float] = None, head_init: str = "lgm", progress: bool = True) -> nn.Linear:
    """A linear head ``nn.Linear(D, C)`` trained by the protocol's recipe on fixed features ``[N, D]``."""
    return _full_data_heads(features, labels, num_classes, epochs, [seed], batch_size, lr, progress, head_init)[0]


def _full_data_heads(features, labels, num_classes, epochs, seeds, batch_size, lr, progress, head_init="lgm"):
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a tensor [N, D], got {getattr(features, 'shape', type(features))}")
    labels = class_labels("labels", labels, features.shape[0])
    features = _check_features(features, labels.shape[0], "features")
    epochs = positive_int("epochs", epochs)
    head_init = one_of("head_init", head_init, HEAD_INITS)
    batch_size = positive_int("batch_size", batch_size)
    num_classes = num_classes or 1 + int(labels.max())
    lr = _default_lr(batch_size) if lr is None else positive_float("lr", lr)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    weight, bias = _train_probes(lambda epoch: features, labels, num_classes, generators, epochs, batch_size,
                                 lr, progress, desc="full-data probe", head_init=head_init)
    return [_as_linear(w, b) for w, b in zip(weight, bias)]


def full_data_probe(train_images: Optional[torch.Tensor], train_labels: torch.Tensor, encoder,
                    test_images: Optional[torch.Tensor], test_labels: torch.Tensor, *,
                    epochs: int = DEFAULT_FULL_DATA_EPOCHS, seeds: Sequence[int] = DEFAULT_SEEDS,
                    batch_size: int = MAX_BATCH_SIZE, lr: Optional[float] = None,
                    train_features: Optional[torch.Tensor] = None,
                    test_features: Optional[torch.Tensor] = None, head_init: str = "lgm",
                    progress: bool = True) -> ProbeResult:
    """The ceiling: the protocol's probe trained on the whole real training set.

    Differences from ``evaluate``, for speed: the training features are computed once, un-augmented
    (resize + centre crop, like the test set), and the probe trains ``epochs`` epochs on them (default 30,
    i.e. 18,000 steps for 60,000 images at batch 100); with that many real images augmentation matters
    little. ``train_features`` / ``test_features`` (e.g. a ``RealStats`` bank) skip the encoding; the
    matching images may then be None. ``heads`` of the result are the trained probes (for
    ``classifier_inheritance``).
    """
    seeds = _check_seeds(seeds)
    if train_features is None:
        train_images, train_labels = _check_set(train_images, train_labels, "train")
        train_features = encode(encoder, train_images, progress=progress, desc="train features")
    if test_features is None:
        test_images, test_labels = _check_set(test_images, test_labels, "test")
        test_features = encode(encoder, test_images, progress=progress, desc="test features")
    train_labels = class_labels("train_labels", train_labels)
    train_features = _check_features(train_features, train_labels.shape[0], "train_features")
    test_labels = class_labels("test_labels", test_labels, test_features.shape[0])
    test_features = _check_features(test_features, test_labels.shape[0], "test_features")
    num_classes = 1 + max(int(train_labels.max()), int(test_labels.max()))
    heads = _full_data_heads(train_features, train_labels, num_classes, epochs, seeds, batch_size, lr, progress,
                             head_init)
    accs = [_accuracy(h.weight.t(), h.bias, test_features, test_labels) for h in heads]
    settings = _probe_settings(train_features.shape[0], epochs, batch_size,
                               _default_lr(batch_size) if lr is None else float(lr), head_init)
    settings.update(augmentation=None, features="precomputed, un-augmented", num_classes=num_classes,
                    test_images=test_features.shape[0])
    return ProbeResult.from_accuracies(accs, seeds, settings, heads)


# --------------------------------------------------------------------------------------------------
# Real-image baselines
# --------------------------------------------------------------------------------------------------

def _class_indices(labels: torch.Tensor, num_classes: int, need: int) -> List[torch.Tensor]:
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < need:
            raise ValueError(f"class {c} has {idx.numel()} real images, fewer than ipc={need}")
        out.append(idx)
    return out


def random_real(images: torch.Tensor, labels: torch.Tensor, ipc: int = 1, seed: int = 0,
                num_classes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` real images per class drawn uniformly without replacement (class-major order)."""
    images, labels = _check_set(images, labels, "real")
    ipc = positive_int("ipc", ipc)
    num_classes = num_classes or 1 + int(labels.max())
    g = torch.Generator().manual_seed(seed)
    picked = [idx[torch.randperm(idx.numel(), generator=g)[:ipc]] for idx in _class_indices(labels, num_classes, ipc)]
    picked = torch.cat(picked)
    return images[picked].clone(), labels[picked].clone()


def _real_features(images, encoder, features, progress):
    if features is not None:
        return _check_features(features, images.shape[0], "features")
    if encoder is None:
        raise ValueError("give the encoder or the precomputed features of the real images")
    return encode(encoder, images, progress=progress, desc="real features")


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the k centres ``[k, D]``."""
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(1).values.pow(2)
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / d2.numel())
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        new = centres.clone()
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:
                new[j] = members.mean(0)
        if torch.equal(new, centres):
            break
        centres = new
    return centres


def _nearest_distinct(candidates: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query row, the index of its nearest candidate row (L2), all different: queries are
    served greedily from the closest (query, candidate) pair on."""
    dist = torch.cdist(queries.double(), candidates.double())
    chosen = torch.full((queries.shape[0],), -1, dtype=torch.long)
    for _ in range(queries.shape[0]):
        flat = int(dist.argmin())
        q, c = divmod(flat, dist.shape[1])
        chosen[q] = c
        dist[q, :] = float("inf")
        dist[:, c] = float("inf")
    return chosen


def class_centroids(images: torch.Tensor, labels: torch.Tensor, encoder=None, ipc: int = 1, *,
                    features: Optional[torch.Tensor] = None, seed: int = 0, num_classes: Optional[int] = None,
                    progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The real images nearest the class centres in the encoder's feature space (class-major).

    ipc 1: the image nearest its class mean (L2). ipc > 1: k-means (k = ipc, k-means++ seeding from
    ``seed``) on each class's features, then the distinct images nearest the k centres. ``features``
    (``[N, D]``, e.g. a ``RealStats`` bank) skips the encoding.
    """
    g = torch.Generator().manual_seed(seed)

    def select(x: torch.Tensor, k: int) -> torch.Tensor:
        return _nearest_distinct(x, x.mean(0, keepdim=True) if k == 1 else _kmeans(x, k, g))

    return _coreset(images, labels, encoder, ipc, features, num_classes, progress, select)


def _coreset(images, labels, encoder, ipc, features, num_classes, progress,
             select: Callable[[torch.Tensor, int], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shared frame of the feature-space baselines: per class (class-major), ``select(x, ipc)`` picks
    ``ipc`` distinct rows of that class's features ``x`` (``[n_c, D]``, fp64); their images are returned."""
    images, labels = _check_set(images, labels, "real")
    ipc = positive_int("ipc", ipc)
    num_classes = num_classes or 1 + int(labels.max())
    per_class = _class_indices(labels, num_classes, ipc)
    feats = _real_features(images, encoder, features, progress)
    picked = torch.cat([idx[select(feats[idx].double(), ipc)] for idx in per_class])
    return images[picked].clone(), labels[picked].clone()


def _kcenter_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (farthest-point) on the rows of ``x``: first the row nearest the mean, then each time
    the row farthest (L2) from its nearest chosen row; ties go to the lowest index."""
    chosen = [int((x - x.mean(0)).norm(dim=1).argmin())]
    nearest = (x - x[chosen[0]]).norm(dim=1)
    for _ in range(1, k):
        nearest[chosen] = -1.0  # chosen rows are never chosen again, even among duplicates
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (x - x[chosen[-1]]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long)


def _herding_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Herding (Welling 2009, in iCaRL's greedy form): the t-th pick is the unchosen row that brings the mean
    of the t chosen rows nearest (L2) the mean of all rows; ties go to the lowest index."""
    mu = x.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(x.shape[0], dtype=torch.bool)
    chosen = []
    for t in range(1, k + 1):
        gap = (mu - (total + x) / t).norm(dim=1).masked_fill(~free, float("inf"))
        i = int(gap.argmin())
        chosen.append(i)
        free[i] = False
        total += x[i]
    return torch.tensor(chosen, dtype=torch.long)


def kcenter_greedy(images: torch.Tensor, labels: torch.Tensor, encoder=None, ipc: int = 1, *,
                   features: Optional[torch.Tensor] = None, num_classes: Optional[int] = None,
                   progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A k-center coreset per class in the encoder's feature space (class-major; Sener and Savarese's greedy
    2-approximation): the real image nearest the class mean first (so ipc 1 is ``class_centroids``'s pick),
    then each time the image farthest (L2) from its nearest pick. Deterministic. ``features`` (``[N, D]``,
    e.g. a ``RealStats`` bank: the features of the real training set) skips the encoding."""
    return _coreset(images, labels, encoder, ipc, features, num_classes, progress, _kcenter_select)


def herding(images: torch.Tensor, labels: torch.Tensor, encoder=None, ipc: int = 1, *,
            features: Optional[torch.Tensor] = None, num_classes: Optional[int] = None,
            progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A herding coreset per class in the encoder's feature space (class-major; Welling 2009, the greedy
    mean matching of iCaRL): pick after pick, the real image that brings the mean of the picks nearest (L2)
    the class mean, without repeats, on the raw features. Deterministic. ``features`` as in
    ``kcenter_greedy``."""
    return _coreset(images, labels, encoder, ipc, features, num_classes, progress, _herding_select)


def nearest_real(distilled, images: torch.Tensor, labels: torch.Tensor, encoder, *,
                 features: Optional[torch.Tensor] = None, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each distilled image, the real image of its class nearest to it in feature space (L2), all
    distinct (greedy, closest pairs first). Tells whether distillation found more than a good real pick."""
    syn_images, syn_labels = _check_set(*_unpack_distilled(distilled), "distilled")
    images, labels = _check_set(images, labels, "real")
    encoder = resolve_encoder(encoder)
    syn_feats = encode(encoder, syn_images)
    feats = _real_features(images, encoder, features, progress)
    out = torch.empty(syn_labels.shape[0], dtype=torch.long)
    for c in syn_labels.unique().tolist():
        rows = (syn_labels == c).nonzero().flatten()
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < rows.numel():
            raise ValueError(f"class {c} has {idx.numel()} real images, fewer than its {rows.numel()} "
                             "distilled images")
        out[rows] = idx[_nearest_distinct(feats[idx], syn_feats[rows])]
    return images[out].clone(), labels[out].clone()


# --------------------------------------------------------------------------------------------------
# SFM's classifier inheritance
# --------------------------------------------------------------------------------------------------

def classifier_inheritance(distilled, encoder, test_images: torch.Tensor, test_labels: torch.Tensor, *,
                           head: nn.Linear, distill_encoder=None, seeds: Sequence[int] = DEFAULT_SEEDS,
                           views: int = DEFAULT_VIEWS, ridge: float = 1e-3,
                           crop_scale: Sequence[float] = CROP_SCALE,
                           test_features: Optional[torch.Tensor] = None, progress: bool = True) -> ProbeResult:
    """SFM's classifier inheritance: predict ``head(P(phi_e(x)))``.

    ``head`` is a linear head ``D_d -> C`` trained once on the full real set's features of the
    distillation encoder ``phi_d`` (e.g. ``full_data_probe(...).heads[0]`` or ``fit_linear_head``).
    ``encoder`` is the evaluation encoder ``phi_e`` (``distill_encoder`` defaults to it). The projector
    ``P = Linear(D_e -> D_d)`` is fitted label-free on the synthetic images only, minimising
    ``MSE(P(phi_e(x)), phi_d(x))`` over ``views`` flip + crop views of each synthetic image (the protocol's
    evaluation augmentation, drawn from each seed). Instead of an iterative optimiser, P is the exact
    minimiser in closed form: ridge regression on centred features (``fastdd.ops.ridge_probe``) with
    ``lam = ridge * mean squared norm of the centred phi_e features``, the bias restoring the means; a
    small ``ridge`` approximates the minimum-norm least-squares fit that gradient descent from zero
    reaches. Storage of the method: the head and P.
    """
    from . import ops

    images, _ = _check_set(*_unpack_distilled(distilled), "distilled")
    test_images, test_labels = _check_set(test_images, test_labels, "test")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear (D_d -> C), got {type(head).__name__}")
    seeds = _check_seeds(seeds)
    views = positive_int("views", views)
    ridge = positive_float("ridge", ridge)
    encoder = resolve_encoder(encoder)
    distill_encoder = encoder if distill_encoder is None else resolve_encoder(distill_encoder)
    _check_same_geometry(encoder, images, test_images)
    test_features = _test_features(encoder, images, test_images, test_features, progress)
    augment = Augment.evaluation(crop_scale=crop_scale)
    device = encoder_device(encoder)
    images = images.detach().to(device, torch.float32)
    accs = []
    for seed in seeds:
        # the same augmented view through both encoders: draw the views once, encode them twice
        g = torch.Generator().manual_seed(seed)
        batch = torch.cat([augment(images, g) for _ in range(views)]).clamp_(0.0, 1.0)
        x_e = encode(encoder, batch, progress=progress, desc=f"inheritance seed {seed}")
        x_d = x_e if distill_encoder is encoder else encode(distill_encoder, batch.to(encoder_device(distill_encoder)))
        if head.in_features != x_d.shape[1]:
            raise ValueError(f"head takes {head.in_features} features but the distillation encoder gives "
                             f"{x_d.shape[1]}")
        mean_e, mean_d = x_e.mean(0), x_d.mean(0)
        centred = x_e - mean_e
        lam = float(ridge) * float(centred.pow(2).sum(1).mean())
        proj = ops.ridge_probe(centred, x_d - mean_d, lam)
        bias = mean_d - mean_e @ proj
        logits = head((test_features @ proj + bias).to(head.weight.device))
        accs.append(100.0 * float((logits.argmax(1).cpu() == test_labels.cpu()).float().mean()))
    settings = {"protocol": "classifier inheritance: head(P(phi_e(x))), P fitted by ridge regression on "
                            "augmented views of the synthetic images",
                "views": views, "ridge": float(ridge), "augmentation": augment.settings(),
                "encoder": getattr(encoder, "name", None),
                "distill_encoder": getattr(distill_encoder, "name", None), "train_images": images.shape[0]}
    return ProbeResult.from_accuracies(accs, seeds, settings)
