#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh), runs the lint and type checks (scripts/lint.sh; a
# finding fails the run) and the whole test suite. Extra arguments go to pytest, e.g.
# scripts/test.sh -k prepare -x (DISKHOOKS_SKIP_LINT=1 skips the checks for such a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
[ "${DISKHOOKS_SKIP_LINT:-}" = 1 ] || bash scripts/lint.sh
exec .venv/bin/python -m pytest "$@"
