#!/usr/bin/env bash
# Set-up: a virtualenv in .venv with the project installed (editable) and its test tools.
# Installs the CPU build of torch==2.13.0 first when the venv has no torch, so pip does not
# pull a multi-GB CUDA build; a GPU user can install their own torch build beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
