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
# nearly release speed. Building every target (as scripts/test.sh does) keeps one set of
# dependency features, so the two scripts share one dependency build instead of making two.
# The first build takes 20–30 minutes on two cores. Services use --release.
cargo build --locked --all-targets
exec "$CARGO_TARGET_DIR/debug/edgesight" run "$@"
