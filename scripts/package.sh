#!/usr/bin/env bash
# Builds the edgesight .deb for amd64 (on this host) or arm64 / armhf (cross-built with
# cross/build.sh), with cargo-deb from crates.io, and prints its path.
#
#   scripts/package.sh [amd64|arm64|armhf]     default: this host's architecture
#
# The package holds the release binary (stripped), the systemd unit with its sysusers and
# tmpfiles files, /etc/edgesight/edgesight.toml and /etc/default/edgesight as conffiles, and the
# README, examples and JSON schemas under /usr/share/doc/edgesight. The metadata is in
# Cargo.toml ([package.metadata.deb]); the maintainer scripts are in systemd/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${EDGESIGHT_CACHE:-$HOME/.cache/edgesight}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
arch="${1:-$(dpkg --print-architecture)}"

# cargo-deb, pinned, built once into the cache. dpkg-shlibdeps (dpkg-dev) computes the
# library dependencies.
cargo_deb_version=3.8.0
cargo_deb="$cache/tools/bin/cargo-deb"
case "$arch" in
  amd64) target=() build=(cargo build --locked --release --bin edgesight) ;;
  arm64) target=(--target aarch64-unknown-linux-gnu) build=(cross/build.sh aarch64) ;;
  armhf) target=(--target armv7-unknown-linux-gnueabihf) build=(cross/build.sh armv7) ;;
  *)
    echo "usage: scripts/package.sh [amd64|arm64|armhf]" >&2
    exit 2 ;;
esac

# Everything but the .deb's path goes to stderr.
{
  if [ "$("$cargo_deb" --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
    cargo install --locked --quiet --root "$cache/tools" cargo-deb --version "$cargo_deb_version"
  fi
  scripts/install-packages.sh dpkg-dev
  "${build[@]}"
} >&2

out="$CARGO_TARGET_DIR/debian"
mkdir -p "$out"
"$cargo_deb" --no-build --locked "${target[@]}" --output "$out" | tail -n 1
