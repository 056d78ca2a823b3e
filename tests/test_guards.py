"""Inputs that used to run into silent wrong results: degenerate encoders (constant or near-zero features)
refused before the first step, CLP's drop-in loss with labels that leave out classes, distilled sets of
NaN or 0..255 images."""
import pytest
import torch
import torch.nn as nn

from test_api import C, FAST, data  # noqa: F401 (the distill tests' data fixture)

import fastdd.api as api
from fastdd import encoders
from fastdd.distilled import DistilledSet
from fastdd.methods import ClosedFormProbeLoss
from fastdd.stats import RealStats


class _Scaled(nn.Module):
    """Features ``scale * tanh(conv(x))`` pooled, plus ``offset``; ``scale=0``: constant features."""

    def __init__(self, scale=1.0, offset=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale, self.offset = scale, offset

    def forward(self, x):
        return self.scale * torch.tanh(self.conv(x)).mean(dim=(2, 3)) + self.offset


@pytest.mark.parametrize("method, init", [("lgm", "noise"), ("lgm", "real"), ("sfm", "real"), ("clp", "noise"),
                                          ("dm", "real")])
@pytest.mark.parametrize("encoder, message", [
    (_Scaled(scale=0.0, offset=0.7), "are the same for every image"),
    (_Scaled(scale=0.0), "are all near zero"),
    (_Scaled(scale=1e-9), "are all near zero"),
])
def test_degenerate_encoders_are_refused_before_any_step(data, method, init, encoder, message):
    x, y = data
    steps = []
    with pytest.raises(ValueError, match=f"encoder {type(encoder).__name__}: the .* {message}"):
        api.distill(x, encoders.wrap(encoder), method=method, labels=y, steps=3, init=init,
                    callback=lambda step, loss: steps.append(step), **FAST)
    assert steps == []


def test_constant_encoder_with_given_statistics_is_refused(data):
    x, y = data
    stats = RealStats.from_features(torch.full((len(y), 6), 2.0), y)  # constant features from elsewhere
    with pytest.raises(ValueError, match="class means of the real features are the same for every image"):
        api.distill(x, _Scaled(), method="clp", labels=y, steps=1, stats=stats, **FAST)


def test_small_but_informative_features_still_run(data):
    x, y = data
    out = api.distill(x, _Scaled(scale=1e-3, offset=5.0), method="sfm", labels=y, steps=2, **FAST)
    assert len(out.history) == 2


def _clp_loss():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(30, 5, generator=g)
    return ClosedFormProbeLoss(RealStats.from_features(real, torch.arange(C).repeat(10)))


def test_clp_loss_refuses_labels_that_leave_out_a_class(monkeypatch):
    loss = _clp_loss()
    zs = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"ys must hold every class 0..2 .*missing classes \[2\]"):
        loss(zs, torch.tensor([0, 1, 1, 0]))
    assert torch.isfinite(loss(zs, torch.tensor([0, 1, 2, 0])))
    monkeypatch.setenv("FASTDD_CHECKS", "0")  # a data-dependent check: off with the others
    assert torch.isfinite(loss(zs, torch.tensor([0, 1, 1, 0])))


@pytest.mark.parametrize("images, message", [
    (torch.full((3, 3, 4, 4), float("nan")), "NaN or Inf"),
    (torch.rand(3, 3, 4, 4) * 255, r"values in \[0, 1\], found .*divide by 255"),
    (torch.full((3, 3, 4, 4), -0.1), r"values in \[0, 1\], found \[-0.1"),
    ((torch.rand(3, 3, 4, 4) * 255).to(torch.uint8), "floating point.*uint8"),
])
def test_distilled_set_refuses_images_outside_0_1(images, message):
    with pytest.raises(ValueError, match=message):
        DistilledSet(images, torch.arange(3), "clp")
    DistilledSet(images.float().nan_to_num(0).clamp(0, 1), torch.arange(3), "clp")  # the same, fixed: fine


def test_errors_never_print_a_whole_module_or_tensor():
    """A module or a tensor passed where a number or a name belongs is named by its kind in the error,
    not by its repr (a whole network's, or every value of a tensor)."""
    import fastdd
    from fastdd.validate import shown

    big = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])
    assert shown(big) == "a Sequential module"
    assert shown(torch.zeros(1000, 3)) == "a torch.float32 tensor of shape (1000, 3)"
    assert len(shown("x" * 500)) <= 80 and shown(3) == "3"
    x, y = torch.rand(8, 3, 8, 8), torch.arange(4).repeat(2)
    for bad in [dict(lr=big), dict(ipc=big), dict(init=big), dict(crop_size=big), dict(steps=torch.ones(100, 100)),
                dict(autocast_dtype=big), dict(options={"lam": big})]:
        with pytest.raises((ValueError, TypeError)) as info:
            fastdd.distill(x, torch.nn.Conv2d(3, 4, 3), labels=y, method="clp", progress=False, **bad)
        assert len(str(info.value)) < 400 and "Linear(in_features" not in str(info.value), (bad, str(info.value))
