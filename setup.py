"""Build script. The pure-Python package needs nothing from here; the optional CUDA extension
(fastdd/csrc/, compiled with ninja into ``fastdd._C``) is built only on request:

    CUDA_HOME=/usr/local/cuda FASTDD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install -e . --no-build-isolation

(CUDA_HOME must name the real toolkit folder: torch guesses it from the nvcc on PATH, which may be a
wrapper script elsewhere.)

``fastdd._ext`` can also build the same sources just in time (``fastdd._ext.build()``).
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTDD_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("fastdd", "csrc", "*.cpp")) + glob.glob(os.path.join("fastdd", "csrc", "*.cu")))
    ext_modules = [
        CUDAExtension(
            name="fastdd._C",
            sources=sources,
            # no -std flag: torch's build adds the C++ standard its headers need (C++20 from torch 2.14)
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
