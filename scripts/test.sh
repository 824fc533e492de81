#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh), runs the lint and type checks (scripts/lint.sh; a
# finding fails the run) and the whole test suite. Extra arguments go to pytest, e.g.
# scripts/test.sh -k prepare -x (DISKHOOKS_SKIP_LINT=1 skips the checks for such a quick run).
# The tests run in DISKHOOKS_TEST_WORKERS parallel workers (default 2; 0 runs them in this process),
# a test file per worker at a time (--dist loadfile: a file's API server or libvirtd starts once): most
# of the suite waits on real processes (API server, agents, rsync, libvirt), not on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
[ "${DISKHOOKS_SKIP_LINT:-}" = 1 ] || bash scripts/lint.sh
workers=${DISKHOOKS_TEST_WORKERS:-2}
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
