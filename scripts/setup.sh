#!/usr/bin/env bash
# Creates .venv with a CPU build of torch and this project (idempotent). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt "$@"
.venv/bin/python -m pip install -q --no-deps -e .
