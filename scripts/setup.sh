#!/usr/bin/env bash
# Creates .venv with a CPU build of torch and this project with its extras (idempotent). PYTHON picks the
# interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt "$@"
# The extras: wiki (Wikipedia XML dumps), parquet and hf (export, Hugging Face comparisons).
.venv/bin/python -m pip install -q -e ".[wiki,parquet,hf]" torch==2.13.0
