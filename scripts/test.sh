#!/usr/bin/env bash
# Run the linter (ruff, configured in pyproject.toml), then the whole test suite (unit,
# multi-process gloo, chaos, and real SLURM where it is installed). Sets up .venv first if
# needed (scripts/setup.sh, which does nothing when nothing changed). Installs nothing on the
# system: the SLURM tests skip, saying so, until `bash scripts/setup.sh --slurm` has run once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
