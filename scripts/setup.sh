#!/usr/bin/env bash
# Set-up: .venv with this project installed (editable) and its test tools.
#
#   bash scripts/setup.sh            # create or update .venv; does nothing when nothing changed
#   bash scripts/setup.sh --slurm    # the same, then install SLURM and munge for tests/slurm
#                                    # (apt-get, as root: the only step that changes the system)
#   bash scripts/setup.sh --force    # reinstall the project even when nothing changed
#
# Up to date means: the project is installed editable from this directory with every
# dependency present, torch is what was asked for, and pyproject.toml and this script are
# unchanged since the last install (a digest of both is kept in .venv/.ftlaunch-setup).
# Code changes need no reinstall (editable install).
#
# torch: a venv that has torch keeps it (install your own CUDA build first to use GPUs).
# A venv without torch gets torch==$TORCH_VERSION from pip's configured index, like every
# other package; on PyPI that is the CUDA build for Linux (GBs of CUDA libraries). With
# TORCH_VARIANT=cpu (or cu126, cu128, ...) torch alone comes from the PyTorch wheel index of
# that variant (TORCH_INDEX_URL overrides the index), and a torch of another variant or version
# is replaced. Everything else, torch's own dependencies included, comes from pip's configured index.
#
# Environment: PYTHON (interpreter for a new .venv, default python3), TORCH_VERSION (2.13.0),
# TORCH_VARIANT, TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

SLURM="" FORCE=""
for arg in "$@"; do
    case "$arg" in
        --slurm) SLURM=1 ;;
        --force) FORCE=1 ;;
        *) echo "setup.sh: unknown option '$arg' (use --slurm, --force)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_VARIANT=${TORCH_VARIANT:-}
WANT_TORCH=${TORCH_VARIANT:+$TORCH_VERSION+$TORCH_VARIANT}
STAMP=.venv/.ftlaunch-setup
say() { echo "set-up: $*"; }

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PY"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c '' 2>/dev/null; then
    echo "set-up: .venv/bin/python does not run (was its base interpreter removed or moved?):" \
         "remove .venv and run this again" >&2
    exit 1
fi
DIGEST=$(cat pyproject.toml scripts/setup.sh | .venv/bin/python -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')

# Why .venv is not up to date (one phrase), or nothing when it is. One interpreter start, no torch
# import; -I keeps the working directory (and its ftlaunch.egg-info) off sys.path.
stale() {
    .venv/bin/python -I - "$PWD" "$WANT_TORCH" "$DIGEST" "$STAMP" <<'PY'
import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

root, want_torch, digest, stamp = sys.argv[1:]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def why():
    torch = version("torch")
    if torch is None:
        return "no torch"
    if want_torch and torch != want_torch:
        return f"torch {torch} installed, {want_torch} asked for"
    try:
        dist = md.distribution("ftlaunch")
    except md.PackageNotFoundError:
        return "project not installed"
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if url.get("url") != Path(root).as_uri() or not url.get("dir_info", {}).get("editable"):
        return f"project installed from {url.get('url', 'elsewhere')}, not editable from {root}"
    for req in dist.requires or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        if version(name) is None:
            return f"dependency {name} missing"
    if not Path(stamp).exists() or Path(stamp).read_text().strip() != digest:
        return "pyproject.toml or scripts/setup.sh changed"
    return ""


print(why())
PY
}

reason=$(stale)
[ -z "$FORCE" ] || reason="--force"
if [ -z "$reason" ]; then
    say ".venv is up to date (--force reinstalls)"
else
    say "installing the project into .venv ($reason)"
    torch=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
    if [ -n "$WANT_TORCH" ] && [ "$torch" != "$WANT_TORCH" ]; then
        index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$TORCH_VARIANT}
        say "torch==$WANT_TORCH from $index (torch alone; its dependencies come with the project)"
        .venv/bin/pip install -q --no-deps --index-url "$index" "torch==$WANT_TORCH"
    elif [ -z "$torch" ]; then
        say "torch==$TORCH_VERSION from pip's configured index (TORCH_VARIANT=cpu picks the CPU build)"
        .venv/bin/pip install -q "torch==$TORCH_VERSION"
    fi
    rm -f "$STAMP"
    .venv/bin/pip install -q -e ".[test]"
    echo "$DIGEST" >"$STAMP"
fi

if [ -n "$SLURM" ]; then
    bash scripts/slurm/testcluster.sh install
fi
