#!/usr/bin/env bash
# Builds the real pim-daemon with sidecar support, for the real-daemon tests.
#
# Obtains pim-daemon's source from crates.io through cargo (nothing of it is
# committed here), applies pim-daemon-<version>.patch beside this script,
# points the `pim-plugin-bridge` dependency at this checkout, and builds two
# daemons into target/pim-daemon/ (cached: a rerun rebuilds only what changed):
#
#   target/pim-daemon/bin/pim-daemon          default features + sidecars
#   target/pim-daemon/bin/pim-daemon-nomsg    sidecars only (no in-process messaging,
#                                             so a messaging sidecar may claim its kinds)
#
# Prints the bin directory's path as its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version=0.1.18
patch="$here/pim-daemon-$version.patch"
out="$root/target/pim-daemon"
mkdir -p "$out/fetch/src" "$out/bin"

# A throwaway package whose only dependency is the daemon: `cargo fetch`
# downloads its source, `cargo metadata` says where it is.
cat > "$out/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-pim-daemon"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
pim-daemon = "=$version"

[workspace]
TOML
: > "$out/fetch/src/lib.rs"
cargo fetch --quiet --manifest-path "$out/fetch/Cargo.toml"
manifest="$(cargo metadata --format-version 1 --manifest-path "$out/fetch/Cargo.toml" |
    python3 -c 'import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "pim-daemon":
        print(p["manifest_path"])')"
upstream="$(dirname "$manifest")"

# The patched copy, made afresh whenever the patch changes.
src="$out/src"
stamp="$(sha256sum "$patch" | cut -d' ' -f1)-$version"
if [ ! -f "$src/.patched" ] || [ "$(cat "$src/.patched")" != "$stamp" ]; then
    rm -rf "$src"
    cp -r "$upstream" "$src"
    chmod -R u+w "$src"
    (cd "$src" && patch --quiet -p1 < "$patch")
    cat >> "$src/Cargo.toml" <<TOML

# Added by pim-sidecar's build.sh: a workspace of its own (it sits below
# ours), and the bridge from this checkout.
[workspace]

[patch.crates-io]
pim-plugin-bridge = { path = "$root/bridge" }
pim-plugin-proto = { path = "$root/proto" }
TOML
    echo "$stamp" > "$src/.patched"
fi

build() {
    cargo build --quiet --manifest-path "$src/Cargo.toml" --target-dir "$out/build" \
        --bin pim-daemon "$@"
    install -m 0755 "$out/build/debug/pim-daemon" "$out/bin/$name"
}
name=pim-daemon build --features sidecars
name=pim-daemon-nomsg build --no-default-features --features sidecars
echo "$out/bin"
