#!/usr/bin/env bash
# Builds and tests crates the way a user's would be built: copied into a
# fresh directory outside this workspace, their path dependencies pointed at
# this checkout.
#
# 1. templates/plugin, the plugin crate the README starts from: formatted,
#    clippy-clean, and its integration test hosts its binary with the test
#    kit.
# 2. Every Rust sample of README.md, compiled as the doctests of a crate
#    that has only the dependencies the README names (those of the template,
#    plus pim-plugin for the daemon-side samples).
#
# Both start from this workspace's Cargo.lock, completed offline (so the
# versions are the ones tested here, and a dependency this workspace does
# not already have is an error, not a silent download), and share
# target/outside/ between runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR="$root/target/outside"

# A TOML basic string holding the checkout's path.
toml_root="$(printf '%s' "$root" | sed 's/\\/\\\\/g; s/"/\\"/g')"

lock() {
    cp "$root/Cargo.lock" Cargo.lock
    cargo update --workspace --offline --quiet
}

echo "--- templates/plugin, copied to $work/my-plugin"
mkdir "$work/my-plugin"
(cd "$root/templates/plugin" && git ls-files -z --cached --others --exclude-standard . | xargs -0 cp --parents -t "$work/my-plugin")
sed -i "s|path = \"../../|path = \"$(printf '%s' "$toml_root" | sed 's/[|&]/\\&/g')/|" "$work/my-plugin/Cargo.toml"
cd "$work/my-plugin"
lock
cargo fmt --check
cargo clippy --locked --quiet --all-targets -- -D warnings
cargo test --locked --quiet

echo "--- the README's Rust samples, as doctests of $work/readme-samples"
mkdir -p "$work/readme-samples/src"
cd "$work/readme-samples"
cat > Cargo.toml <<TOML
[package]
name = "readme-samples"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
pim-sidecar = { path = "$toml_root/sidecar-sdk" }
pim-plugin-bridge = { path = "$toml_root/bridge", features = ["testkit"] }
pim-plugin = "0.1"
tempfile = "3"
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
TOML
cp "$root/README.md" README.md
printf '#![doc = include_str!("../README.md")]\n' > src/lib.rs
lock
cargo test --locked --quiet --doc
