#!/usr/bin/env bash
# Set-up plus the whole test suite (CPU only; GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh -r requirements-test.txt
.venv/bin/ruff check pld_ds data_prep tests bench
.venv/bin/python -m pytest -q "$@"
