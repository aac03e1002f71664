#!/usr/bin/env bash
# Installs everything starcoder-lsp and its tests need into ./.venv, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch (CPU) is only the reference the tests compare against; the server never imports it.
.venv/bin/python -m pip install --quiet -e '.[test]'

# The editor clients' tests: Neovim (Debian's, 0.7.2 on bookworm), Node.js and npm for the
# VS Code extension, openssl for the TLS tests; then the extension's locked npm packages.
missing=""
command -v nvim >/dev/null || missing="$missing neovim"
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
command -v openssl >/dev/null || missing="$missing openssl"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
(cd editors/vscode && npm ci --no-audit --no-fund --loglevel=error)
echo "installed into $(pwd)/.venv; run the tests with ./test.sh"
