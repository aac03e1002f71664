#!/usr/bin/env bash
# Installs everything starcoder-lsp and its tests need into ./.venv, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch (CPU) is only the reference the tests compare against; the server never imports it.
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "installed into $(pwd)/.venv; run the tests with ./test.sh"
