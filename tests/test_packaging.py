"""The package as users get it: the wheel and the sdist are built through setuptools' PEP 517 hooks
(no network, the environment's setuptools) and hold what an install needs: the code, py.typed, the
CUDA extension's sources for the just-in-time build, the licence, one version, the declared
dependencies."""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastdd

ROOT = Path(__file__).resolve().parents[1]


def _build(kind: str, out: Path) -> Path:
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return _build("wheel", out), _build("sdist", out)


def test_wheel_holds_the_package_its_typing_marker_the_cuda_sources_and_the_licence(artifacts):
    wheel, _ = artifacts
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "fastdd" / "csrc").iterdir())
    assert sources and {f"fastdd/csrc/{s}" for s in sources} <= names
    assert {"fastdd/__init__.py", "fastdd/api.py", "fastdd/py.typed", "fastdd/methods/dm.py",
            "fastdd/ops/aot.py"} <= names
    info = f"fastdd-{fastdd.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"Version: {fastdd.__version__}" in meta and "License-Expression: MIT" in meta
    for dependency in ("torch", "torchvision", "Pillow", "timm", "numpy", "tqdm"):
        assert f"Requires-Dist: {dependency}" in meta, dependency
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_sdist_holds_the_sources_tests_and_licence(artifacts):
    _, sdist = artifacts
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "fastdd/py.typed",
            "fastdd/csrc/fastdd_ops.cpp", "fastdd/csrc/fastdd_kernels.h"} <= names


def test_the_extension_finds_its_sources_inside_the_package():
    from fastdd import _ext

    found = _ext.sources()
    assert found and all(Path(p).parent == ROOT / "fastdd" / "csrc" for p in found)


def test_every_public_module_is_an_attribute_of_the_package_after_a_plain_import():
    """``import fastdd`` then ``fastdd.export.load(...)`` (as the README writes it) in a fresh process: every
    module of the package without a leading underscore is reachable lazily."""
    package = Path(fastdd.__file__).parent
    public = sorted(p.stem for p in [*package.glob("*.py"), *(q.parent for q in package.glob("*/__init__.py"))]
                    if not p.stem.startswith("_"))
    assert sorted(fastdd._SUBMODULES) == public
    code = ("import fastdd, sys, types; "
            "print(all(isinstance(getattr(fastdd, m), types.ModuleType) for m in sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *public], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
