#!/usr/bin/env bash
# Create .venv and install ccalign (editable) with what the tests and the demo need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 is pinned first: on these machines that is a CPU wheel already on disk; an
# unpinned torch would pull a multi-GB CUDA build. Users with a GPU install their own torch first.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch>=2.5"
fi
.venv/bin/pip install -q -e ".[dev]"
# The embedded demo data set: Fashion-MNIST from Debian's package, when it is not there yet.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -z "${CCALIGN_FASHION_MNIST:-}" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }) >/dev/null
    else
        echo "note: Fashion-MNIST not found; install the Debian package dataset-fashion-mnist" \
             "or set CCALIGN_FASHION_MNIST to a folder holding its four idx .gz files" >&2
    fi
fi
