#!/usr/bin/env bash
# Builds and tests crates the way a user's would be built: copied into a
# fresh directory outside this workspace, their path dependencies pointed at
# this checkout.
#
# 1. templates/plugin, the plugin crate the README starts from: its
#    integration test hosts its binary with the test kit.
# 2. Every Rust sample of README.md, compiled as the doctests of a crate
#    that has only the dependencies the README names (those of the template,
#    plus pim-plugin for the daemon-side samples).
#
# The build shares target/outside/ between runs (the lock file of this
# workspace is copied in, so the versions are the ones tested here).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR="$root/target/outside"

echo "--- templates/plugin, copied to $work/my-plugin"
cp -r "$root/templates/plugin" "$work/my-plugin"
sed -i "s#path = \"../../#path = \"$root/#" "$work/my-plugin/Cargo.toml"
cp "$root/Cargo.lock" "$work/my-plugin/Cargo.lock"
(cd "$work/my-plugin" && cargo test --quiet)

echo "--- the README's Rust samples, as doctests of $work/readme-samples"
mkdir -p "$work/readme-samples/src"
cat > "$work/readme-samples/Cargo.toml" <<TOML
[package]
name = "readme-samples"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
pim-sidecar = { path = "$root/sidecar-sdk" }
pim-plugin-bridge = { path = "$root/bridge", features = ["testkit"] }
pim-plugin = "0.1"
tempfile = "3"
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
TOML
printf '#![doc = include_str!("%s/README.md")]\n' "$root" > "$work/readme-samples/src/lib.rs"
cp "$root/Cargo.lock" "$work/readme-samples/Cargo.lock"
(cd "$work/readme-samples" && cargo test --quiet --doc)
