#!/usr/bin/env bash
# Installs what the tests need (GStreamer with its RTSP server library, Mosquitto, OpenSSL for
# the TLS test certificates, systemd's tools for the unit checks, onnxruntime for the reference
# test, lintian for the package check, Fashion-MNIST for the training test), starts Mosquitto on a free 127.0.0.1 port, and runs every
# test (with the `torch` feature, on a CPU-only libtorch that scripts/libtorch.sh assembles from
# PyPI wheels); then builds, installs and purges the .deb, and cross-builds for ARM and compares the ARM
# binaries with the x86 one under qemu (cross/ installs the cross compilers and ARM libraries).
#
# Caches live outside the checkout (~/.cache/edgesight): the cargo target directory and a
# Python virtual environment. Both are rebuilt when missing, so a clean machine works too.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${EDGESIGHT_CACHE:-$HOME/.cache/edgesight}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
mkdir -p "$cache"

# 1. System packages, installed only when missing.
scripts/install-packages.sh pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
  gstreamer1.0-libav gstreamer1.0-tools gstreamer1.0-rtsp libgstrtspserver-1.0-dev \
  mosquitto mosquitto-clients openssl systemd python3 python3-venv lintian dataset-fashion-mnist

# 2. onnxruntime (PyPI) for the backbone reference test, in a venv outside the checkout.
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import onnxruntime, numpy' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --cache-dir "$cache/pip" onnxruntime numpy
fi
export EDGESIGHT_PYTHON="$venv/bin/python"

# The shared media corpus the tests read (not in the repository: see README, "Tests").
corpus="${EDGESIGHT_CORPUS:-$(pwd)/../shared/corpus}"
if [ ! -f "$corpus/FILES.md" ]; then
  echo "error: the media corpus is not at $corpus; set EDGESIGHT_CORPUS to its directory" >&2
  exit 1
fi
export EDGESIGHT_CORPUS="$corpus"

# 3. A Mosquitto of our own on a free loopback port, stopped when this script ends.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
broker_dir=$(mktemp -d)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" \
  > "$broker_dir/mosquitto.conf"
mosquitto -c "$broker_dir/mosquitto.conf" > "$broker_dir/log" 2>&1 &
broker_pid=$!
trap 'kill "$broker_pid" 2>/dev/null || true; rm -rf "$broker_dir"' EXIT
for _ in $(seq 50); do
  if mosquitto_pub -h 127.0.0.1 -p "$port" -t edgesight/probe -n 2>/dev/null; then break; fi
  sleep 0.1
done
export EDGESIGHT_TEST_MQTT_PORT="$port"
echo "mosquitto on 127.0.0.1:$port"

# 4. libtorch for the `torch` feature: a CPU-only LIBTORCH directory from the PyPI wheels,
# cached under ~/.cache/edgesight (scripts/libtorch.sh says how it is made).
libtorch_env=$(scripts/libtorch.sh)
eval "$libtorch_env"

# 5. Style and lints of both builds (default: tract only, as shipped; and with `torch`), then
# every test (unit, integration, doc) and a compile of the benchmarks with `torch`, which runs
# the tract tests too and the parity tests between the two backends.
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --locked -- -D warnings
  cargo clippy --all-targets --locked --features torch -- -D warnings
else
  echo "cargo clippy is not installed; lints skipped"
fi
cargo build --all-targets --locked --features torch
cargo test --doc --locked --features torch
cargo test --all-targets --locked --features torch

# 6. Packages and ARM builds. The amd64 .deb is checked, installed and purged for real; aarch64 is
# cross-built, compared with the x86 binary under qemu, and packaged. armv7 costs another release
# build (about 12 minutes on 2 cores without a cache): it runs when this script has taken less
# than EDGESIGHT_ARMV7_BEFORE_MIN minutes (default 30) so far, and is otherwise skipped with a
# line saying so, keeping a run without caches inside CI's time (`cross/check.sh armv7` runs it).
# It is skipped the same way when Debian's armhf packages cannot be installed: a mirror serving
# a bookworm-security armhf index of the wrong size for over a day made apt-get fail here; the
# archive's state is not the project's; apt-get's own error stays above the line. A failure of
# the build or the comparison itself still fails the run.
deb=$(scripts/package.sh amd64)
scripts/check-package.sh "$deb"
cross/check.sh aarch64 --input-size 64
deb=$(scripts/package.sh arm64)
scripts/check-package.sh "$deb"
if (( SECONDS >= ${EDGESIGHT_ARMV7_BEFORE_MIN:-30} * 60 )); then
  echo "armv7 check skipped: this run took $((SECONDS / 60)) min before it (cross/check.sh armv7)"
elif ! cross/build.sh armv7 --packages; then
  echo "armv7 check SKIPPED: the armhf cross-build packages could not be installed (apt-get's" \
    "error above); the aarch64 check ran (cross/check.sh armv7 runs it once apt can)"
else
  cross/check.sh armv7 --input-size 64
  deb=$(scripts/package.sh armhf)
  scripts/check-package.sh "$deb"
fi
