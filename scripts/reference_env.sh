#!/usr/bin/env bash
# Create the throw-away virtual environment that holds the published SINGD (PyPI singd 0.0.5).
#
# Usage: scripts/reference_env.sh [VENV_DIR]      (default: /tmp/singd-ref-venv)
#
# The reference package is also called `singd`, exactly like ours, so it must never be
# importable from the project's environment: it lives in its own venv, outside the
# repository, and is only ever run as a subprocess of that venv's python with the
# working directory outside the repository (see scripts/make_reference_fixtures.py and
# benchmarks/reference_step.py). Neither the project nor its tests depend on it.
set -euo pipefail

VENV="${1:-/tmp/singd-ref-venv}"

# torch first, pinned to the version the fixtures were made with; pip takes it from a
# local wheel where one is on disk, else downloads it (CPU build).
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" \
    --extra-index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip install --quiet "singd==0.0.5" einops einconv

# Prove the venv resolves the published package, not ours: run from / and print its path.
cd /
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import singd
import torch

print(f"reference singd {md.version('singd')} at {singd.__file__}; torch {torch.__version__}")
assert "site-packages" in singd.__file__, singd.__file__
PY
