#!/usr/bin/env bash
# Builds edgesight and runs the built-in demo: a synthetic ResNet-50 bundle generated on first
# use, GStreamer's test pattern as the stream, and an embedded MQTT broker on 127.0.0.1:1883
# unless a broker already listens there. Every published message is printed. Ctrl-C stops it.
#
# Only GStreamer is installed (apt-get, when missing); nothing else is downloaded but crates.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgesight/target}"
scripts/install-packages.sh pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-libav

# The dev profile builds dependencies with opt-level 3 (see Cargo.toml), so the demo runs at
# nearly release speed and shares its build with scripts/test.sh. Services use --release.
cargo build --locked --bin edgesight
exec "$CARGO_TARGET_DIR/debug/edgesight" run "$@"
