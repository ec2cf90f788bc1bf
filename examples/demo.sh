#!/usr/bin/env bash
# The main job: builds the demo host and the echo sidecar, then runs the demo
# (a simulated three-node mesh, each node hosting the echo sidecar as a real
# process). Arguments go to demo-host, e.g. `--serve` to keep it running.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked -p pim-sidecar-examples --bin demo-host --bin echo-sidecar
target="${CARGO_TARGET_DIR:-$PWD/target}/debug"
exec "$target/demo-host" "$@"
