#!/usr/bin/env bash
# Lint and type checks that fail the build: ruff (pyproject's [tool.ruff]) and mypy --strict
# (pyproject's [tool.mypy] lists the packages, benchmarks, scripts and tests). Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[lint] ruff check" >&2
.venv/bin/ruff check .
echo "[lint] mypy --strict" >&2
.venv/bin/mypy --strict
