#!/usr/bin/env bash
# Create ./.venv with the exact locked stack and the project installed in editable mode.
# Idempotent: a second run only re-syncs. Works on a fresh machine with Python 3.11 only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "hybridmim needs Python 3.11, found " + sys.version.split()[0])'

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv==0.13.9
UV=.venv/bin/uv
# A local wheel directory (this project's machines keep the CPU torch wheel there) is used when
# it exists; elsewhere torch==2.13.0 comes from the registry. Either way torch is pinned.
FIND_LINKS=()
WHEELDIR=${HYBRIDMIM_WHEELDIR:-/opt/wheels}
[ -d "$WHEELDIR" ] && FIND_LINKS=(--find-links "$WHEELDIR")
# Bytecode is compiled at install time: without .pyc files `import monai` costs ~10 s per job.
export UV_COMPILE_BYTECODE=1 VIRTUAL_ENV="$PWD/.venv"
"$UV" pip install -q "${FIND_LINKS[@]}" "torch==2.13.0" -r requirements.lock
"$UV" pip install -q --no-deps -e .
echo "installed: $(.venv/bin/python -c 'import torch, monai, snakemake, mlflow; print("torch", torch.__version__, "monai", monai.__version__, "snakemake", snakemake.__version__, "mlflow", mlflow.__version__)')"
