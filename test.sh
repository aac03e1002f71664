#!/usr/bin/env bash
# Lints and runs the whole test suite. Extra arguments go to pytest.
# Two pytest workers by default (TEST_WORKERS=0 runs in this process): much of the suite waits
# on servers and editors starting, and a test file's tests stay on one worker, sharing its
# module's model and server.
set -euo pipefail
cd "$(dirname "$0")"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q --durations=25 -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
