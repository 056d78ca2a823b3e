"""Shared test set-up: deterministic seeds, the `gpu` and `interpreter` markers, the devices a Triton
kernel test runs on (`KERNEL_DEVICES`), the tiny real data and encoder fixtures that several test files
use (built once per session), and `missing_tool`.

The suite runs as two pytest processes (``make test`` runs both and fails when either fails):

- the normal process, ``pytest -m "not interpreter"``: references, validation, the sm_90 builds, and on
  a CUDA machine every Triton kernel test, compiled, on the GPU (the ``cuda`` entry of
  `KERNEL_DEVICES`);
- the interpreter process, ``TRITON_INTERPRET=1 pytest -m interpreter``: the same kernel tests on CPU
  tensors under Triton's interpreter. Triton reads TRITON_INTERPRET when a ``@triton.jit`` decorator runs
  (when fastdd's op modules are imported), so it is set in the environment before the process starts.

A test run in the other process than its own is skipped with the command that runs it.
"""
import os

import pytest
import torch

from fastdd._backend import interpreter_enabled

INTERPRETER_COMMAND = "TRITON_INTERPRET=1 python -m pytest -m interpreter"

# A Triton kernel test takes `device`: "cpu" runs it in the interpreter process, "cuda" (on a machine
# with a GPU) compiled in the normal process.
KERNEL_DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter, id="interpreter")] + (
    [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")] if torch.cuda.is_available() else [])


def missing_tool(reason: str) -> None:
    """Skip a test whose build tool (nvcc, ninja, Triton, ptxas) is absent, or fail it under
    FASTDD_REQUIRE_TOOLCHAIN=1 (set by .ci/run: CI must compile the kernels and the extension, so a
    missing tool there is an error, not a silent skip)."""
    if os.environ.get("FASTDD_REQUIRE_TOOLCHAIN") == "1":
        pytest.fail(f"{reason} (FASTDD_REQUIRE_TOOLCHAIN=1)")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors; only in the process "
                                       f"started with TRITON_INTERPRET=1 ({INTERPRETER_COMMAND})")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    interpreter_only = pytest.mark.skip(reason=f"runs in the Triton interpreter process: {INTERPRETER_COMMAND}")
    normal_only = pytest.mark.skip(reason="runs in the normal process (this one has TRITON_INTERPRET=1): "
                                          'python -m pytest -m "not interpreter"')
    for item in items:
        in_interpreter_part = "interpreter" in item.keywords
        if in_interpreter_part != interpreter_enabled():
            item.add_marker(normal_only if interpreter_enabled() else interpreter_only)
        elif "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


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
