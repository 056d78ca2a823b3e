"""Shared test set-up: deterministic seeds, a `gpu` marker that skips without CUDA, the tiny real
data and encoder fixtures that several test files use (built once per session), and `missing_tool`."""
import os

import pytest
import torch


def missing_tool(reason: str) -> None:
    """Skip a test whose build tool (nvcc, ninja, Triton, ptxas) is absent, or fail it under
    FASTDD_REQUIRE_TOOLCHAIN=1 (set by .ci/run: CI must compile the kernels and the extension, so a
    missing tool there is an error, not a silent skip)."""
    if os.environ.get("FASTDD_REQUIRE_TOOLCHAIN") == "1":
        pytest.fail(f"{reason} (FASTDD_REQUIRE_TOOLCHAIN=1)")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def fmnist32():
    """Fashion-MNIST at 32 px: (train, test) Splits."""
    import fastdd.data

    return fastdd.data.load("fashion-mnist", size=32)


@pytest.fixture(scope="session")
def mobilenet():
    """The pretrained ImageNet MobileNetV2, frozen, on the CPU."""
    import fastdd.encoders

    return fastdd.encoders.load("torchvision:mobilenet_v2", weights="imagenet")
