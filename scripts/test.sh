#!/usr/bin/env bash
# Run the linter (ruff, configured in pyproject.toml), then the whole test suite (unit,
# multi-process gloo, chaos). Sets up .venv first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
