"""Published recipes (``distill(..., recipe="paper")``): declared by every method in the registry, applied
in one argument, explicit arguments win, an unknown name is an error listing the method's recipes."""
import inspect
import warnings

import pytest
import torch

from test_api import _TinyNet  # the tiny convolutional encoder of the distill tests

import fastdd.api as api
import fastdd.encoders
import fastdd.methods as registry
from fastdd import encoders
from fastdd.methods.base import RECIPE_KEYS, Recipe, RecipeWarning

C, PER_CLASS = 2, 4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return encoders.wrap(_TinyNet(d=6))


def _data(size):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(C).repeat(PER_CLASS)
    x = torch.rand(len(y), 3, size, size, generator=g) * 0.5 + 0.2
    x[torch.arange(len(y)), y] += 0.25
    return x.clamp(0.05, 0.95), y


def test_every_method_declares_its_paper_recipe():
    for name in registry.names():
        recipe = registry.get(name).recipes["paper"]
        assert isinstance(recipe, Recipe) and recipe.source
        assert set(recipe.values) <= set(RECIPE_KEYS)
    lgm = registry.get("lgm").recipes["paper"]
    assert lgm.values == dict(init="noise", lr=2e-3, steps=5000, copies=10, parameterization="pyramid",
                              extend_every=200, crop_scale=(0.08, 1.0), noise_prob=0.5, crop_size=224)
    assert lgm.gpu_autocast == torch.float16 and lgm.image_size == 256
    dm = registry.get("dm").recipes["paper"]
    assert dm.values == dict(init="real", parameterization="pixels", steps=20000, copies=1)
    assert any("SGD" in n for n in dm.not_applicable) and any("DSA" in n for n in dm.not_applicable)
    for name in ("sfm", "clp"):  # what the papers do not publish is said, not invented
        recipe = registry.get(name).recipes["paper"]
        assert recipe.values == dict(copies=1) and {"lr", "steps", "init"} <= set(recipe.not_public)
    assert {"lam", "tau"} <= set(registry.get("clp").recipes["paper"].not_public)


def test_recipe_keys_are_the_distill_arguments_that_default_to_none():
    # only then is an explicit argument told apart from an unset one, so that it wins over the recipe
    params = inspect.signature(api.distill).parameters
    for key in RECIPE_KEYS:
        assert key in params and params[key].default is None, key
    with pytest.raises(ValueError, match="flip_prob"):
        Recipe(source="x", values={"flip_prob": 0.5})


def test_lgm_paper_recipe_in_one_argument_and_explicit_arguments_win(tiny):
    x, y = _data(16)
    with pytest.warns(RecipeWarning, match="256 px"):
        out = api.distill(x, tiny, method="lgm", labels=y, steps=1, recipe="paper", progress=False)
    s = out.settings
    assert (s["steps"], s["lr"], s["init"], s["copies"], s["parameterization"], s["extend_every"]) == \
        (1, 2e-3, "noise", 10, "pyramid", 200)
    assert s["crop_scale"] == [0.08, 1.0] and s["noise_prob"] == 0.5 and s["crop_size"] == [224, 224]
    assert s["autocast_dtype"] is None  # on the CPU: no fp16 autocast
    assert out.images.shape == (C, 3, 16, 16)  # stored at the data's size, cropped to 224 for the encoder
    with pytest.warns(RecipeWarning):
        out = api.distill(x, tiny, method="lgm", labels=y, steps=1, recipe="paper", lr=0.05, crop_size=8,
                          copies=2, init="real", noise_prob=0.0, progress=False)
    s = out.settings
    assert (s["lr"], s["crop_size"], s["copies"], s["init"], s["noise_prob"]) == (0.05, [8, 8], 2, "real", 0.0)
    assert s["crop_scale"] == [0.08, 1.0]  # the rest still the recipe's


def test_dm_paper_recipe_through_distill(tiny):
    x, y = _data(12)
    out = api.distill(x, tiny, method="dm", labels=y, steps=2, recipe="paper", progress=False)
    s = out.settings
    assert (s["init"], s["parameterization"], s["copies"], s["steps"]) == ("real", "pixels", 1, 2)
    default = api.distill(x, tiny, method="dm", labels=y, steps=2, progress=False)
    assert default.settings["parameterization"] == "pyramid"  # no recipe: the calibrated defaults


def test_unknown_recipe_is_an_error_listing_the_methods_recipes(tiny):
    x, y = _data(12)
    with pytest.raises(ValueError, match=r"recipe must be one of method 'sfm'.*'paper'.*'papr'"):
        api.distill(x, tiny, method="sfm", labels=y, steps=1, recipe="papr", progress=False)
    with pytest.raises(ValueError, match="recipe"):
        api.distill(x, tiny, method="clp", labels=y, steps=1, recipe=1, progress=False)


def test_gpu_autocast_and_image_size(monkeypatch):
    lgm = registry.get("lgm")
    args = {k: None for k in RECIPE_KEYS}
    args.update(images=torch.zeros(1, 3, 256, 256), device=None, encoder=None)
    monkeypatch.setattr(fastdd.encoders, "resolve_device", lambda device, encoder=None: torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 256 px: the recipe's own size, no warning
        out = lgm.apply_recipe("paper", args)
    assert out["autocast_dtype"] == torch.float16 and out["lr"] == 2e-3
    assert lgm.apply_recipe("paper", dict(args, autocast_dtype=torch.bfloat16))["autocast_dtype"] == torch.bfloat16
    assert lgm.apply_recipe(None, args) is args
    monkeypatch.setattr(fastdd.encoders, "resolve_device", lambda device, encoder=None: torch.device("cpu"))
    assert lgm.apply_recipe("paper", args)["autocast_dtype"] is None
