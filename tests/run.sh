#!/usr/bin/env bash
# Runs every check and test of the workspace from a fresh clone.
#
# Installs the test tools it needs into git-ignored folders of the checkout
# (.venv/ for PyPI packages, .tools/ for npm packages, examples/node/
# node_modules for the Node.js sidecar), builds the real
# pim-daemon with the sidecar patch (integrations/pim-daemon/build.sh, into
# target/), then runs cargo fmt --check, clippy and cargo doc with warnings
# denied, cargo test for the whole workspace, and tests/outside.sh (the
# template plugin crate and the README's samples, built outside it). Under CI=true a
# test whose tool is missing fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "test tools (.venv)"
stamp=.venv/.requirements
if [ ! -f "$stamp" ] || ! cmp -s tests/requirements.txt "$stamp"; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
    cp tests/requirements.txt "$stamp"
fi
export PIM_GRPCURL="$PWD/.venv/bin/grpcurl"
export PIM_PYTHON="$PWD/.venv/bin/python3"
"$PIM_GRPCURL" -version
# The Python sidecar's stubs, generated from proto/ by grpcio-tools.
"$PIM_PYTHON" -c 'import sys; sys.path.insert(0, "examples/python"); import pim_sidecar'

step "test tools (.tools: npm)"
if [ ! -x .tools/node_modules/.bin/buf ] || ! cmp -s tests/package.json .tools/package.json; then
    mkdir -p .tools
    cp tests/package.json .tools/package.json
    npm install --prefix .tools --no-audit --no-fund --silent
fi
export PIM_BUF="$PWD/.tools/node_modules/.bin/buf"
"$PIM_BUF" --version

step "Node.js sidecar packages (examples/node/node_modules)"
if ! cmp -s examples/node/package-lock.json examples/node/node_modules/.installed-lock 2>/dev/null; then
    npm ci --prefix examples/node --no-audit --no-fund --silent
    cp examples/node/package-lock.json examples/node/node_modules/.installed-lock
fi
export PIM_NODE="$(command -v node)"
"$PIM_NODE" --version

step "the real pim-daemon, patched for sidecars (target/pim-daemon, cached)"
bins="$(integrations/pim-daemon/build.sh | tail -n 1)"
export PIM_DAEMON_BIN_DIR="$bins"
ls "$PIM_DAEMON_BIN_DIR"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the daemon side alone, as a daemon links it (no testkit feature)"
cargo clippy -p pim-plugin-bridge --lib --locked -- -D warnings

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked

step "cargo test"
cargo test --workspace --locked

step "a plugin crate and the README's samples, outside the workspace (tests/outside.sh)"
tests/outside.sh
