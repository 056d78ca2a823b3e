#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels of the fused linear cross-entropies that
# benchmarks/ops_bench.py compares fastdd's op with on a GPU: Liger-Kernel and Apple's cut-cross-entropy
# (pure Python over Triton; no dependencies fetched: the GPU machine has torch and Triton). The lent GPU
# machine reaches no network, so the folder travels with the device run (carry: [".gpu-wheels"]) and
# benchmarks/gpu_check.sh installs it there. The folder is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu-wheels
"$PY" -m pip download --no-deps --only-binary=:all: -d .gpu-wheels "liger-kernel" "cut-cross-entropy"
ls -l .gpu-wheels
