#!/usr/bin/env bash
# Run here (with network), before a GPU visit: downloads the small tools the GPU machine may lack
# (pytest, psutil, matplotlib and their pure-Python / ABI3 dependencies, for its Python 3.12) into
# .gpu/wheels (git-ignored, ~20 MB).  scripts/gpu-check.sh installs those it does not find there.
# numpy and Pillow are left out: the machine's torch / torchvision bring their own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
dest=.gpu/wheels
mkdir -p "$dest"
pins=$(grep -E '^(pytest|psutil|matplotlib)==' constraints.txt)
# shellcheck disable=SC2086
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" $pins
rm -f "$dest"/numpy-*.whl "$dest"/pillow-*.whl
du -sh "$dest"
