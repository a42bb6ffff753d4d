#!/usr/bin/env bash
# Run the whole test suite (unit, multi-process gloo, chaos). Sets up .venv first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
