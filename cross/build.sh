#!/usr/bin/env bash
# Cross-builds the tract-only daemon for an ARM board on an x86-64 Debian host.
#
#   cross/build.sh aarch64|armv7 [--env | --packages] [cargo build arguments]
#
# aarch64 = aarch64-unknown-linux-gnu (Debian arm64: Raspberry Pi 3/4/5 and Jetson with a 64-bit
# OS), armv7 = armv7-unknown-linux-gnueabihf (Debian armhf: 32-bit Raspberry Pi OS and older
# boards). Without cargo arguments it builds `--release --bin edgesight` and prints the binary's
# path and stripped size; arguments replace those (e.g. `--profile dev --all-targets`).
# `--env` prints the environment instead, for `eval "$(cross/build.sh aarch64 --env)"` followed
# by your own `cargo build --target …`. `--packages` only installs what the build needs.
#
# What it installs (apt-get, only what is missing): the cross compiler gcc-<triplet> and, from
# Debian's multiarch archive, the target's GStreamer, GLib and ORC development files. One file
# set cannot come from multiarch: libgstreamer-plugins-base1.0-dev has no Multi-Arch field, so
# its arm64, armhf and amd64 builds cannot be installed side by side (the host's own build needs
# the amd64 one). The script downloads the target's .deb with `apt-get download` (the version of
# the installed runtime library), unpacks it under the cache and points pkg-config and the
# linker there; nothing on the host changes.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: cross/build.sh aarch64|armv7 [--env | --packages] [cargo build arguments]" >&2
  exit 2
}

case "${1:-}" in
  aarch64 | aarch64-unknown-linux-gnu)
    target=aarch64-unknown-linux-gnu arch=arm64 triplet=aarch64-linux-gnu ;;
  armv7 | armv7-unknown-linux-gnueabihf)
    target=armv7-unknown-linux-gnueabihf arch=armhf triplet=arm-linux-gnueabihf ;;
  *) usage ;;
esac
shift
print_env=false
packages_only=false
if [ "${1:-}" = "--env" ]; then
  print_env=true
  shift
elif [ "${1:-}" = "--packages" ]; then
  packages_only=true
  shift
fi

cache="${EDGESIGHT_CACHE:-$HOME/.cache/edgesight}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"

# Progress goes to stderr so that `--env` output stays clean for eval.
{
  scripts/install-packages.sh "gcc-$triplet" "libgstreamer1.0-dev:$arch" \
    "libgstreamer-plugins-base1.0-0:$arch" "liborc-0.4-dev:$arch"
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
} >&2
if $packages_only; then
  exit 0
fi

# The plugins-base development files, unpacked once per version.
version=$(dpkg-query -W -f='${Version}' "libgstreamer-plugins-base1.0-0:$arch")
side="$cache/cross/$arch/gst-plugins-base-dev_$version"
if [ ! -f "$side/.complete" ]; then
  rm -rf "$side"
  mkdir -p "$side/deb"
  (
    cd "$side/deb"
    # _apt cannot write into a directory under root's home; the download is then made as root.
    apt-get download -qq "libgstreamer-plugins-base1.0-dev:$arch=$version" \
      2> >(grep -v unsandboxed >&2)
  ) >&2 || {
    echo "error: cannot download libgstreamer-plugins-base1.0-dev:$arch $version, the version" \
      "of the installed libgstreamer-plugins-base1.0-0:$arch; when the archive has moved on," \
      "upgrade both architectures' libraries (apt-get update && apt-get upgrade) and run again" >&2
    exit 1
  }
  dpkg-deb -x "$side"/deb/*.deb "$side/root"
  # The package's libfoo.so links are relative (libfoo.so -> libfoo.so.0); the libraries
  # themselves are in the host's multiarch directory.
  for link in "$side/root/usr/lib/$triplet"/lib*.so; do
    ln -sf "/usr/lib/$triplet/$(readlink "$link")" "$link"
  done
  touch "$side/.complete"
fi

upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
lower=${target//-/_}
# Cargo ignores target.<triple>.rustflags when RUSTFLAGS is set, so the search path joins
# RUSTFLAGS then.
search="-L native=$side/root/usr/lib/$triplet"
if [ -n "${RUSTFLAGS:-}" ]; then
  link_flags="export RUSTFLAGS='$RUSTFLAGS $search'"
else
  link_flags="export CARGO_TARGET_${upper}_RUSTFLAGS='$search'"
fi
env_lines=(
  "export CARGO_TARGET_DIR='$CARGO_TARGET_DIR'"
  "export CARGO_TARGET_${upper}_LINKER='$triplet-gcc'"
  "$link_flags"
  "export CC_${lower}='$triplet-gcc'"
  "export AR_${lower}='$triplet-ar'"
  "export PKG_CONFIG_ALLOW_CROSS=1"
  "export PKG_CONFIG_${lower}='$triplet-pkg-config'"
  "export PKG_CONFIG_PATH_${lower}='$side/root/usr/lib/$triplet/pkgconfig'"
)
if $print_env; then
  printf '%s\n' "${env_lines[@]}"
  exit 0
fi
for line in "${env_lines[@]}"; do eval "$line"; done

if [ "$#" -eq 0 ]; then
  cargo build --locked --release --target "$target" --bin edgesight
  binary="$CARGO_TARGET_DIR/$target/release/edgesight"
  stripped=$(mktemp)
  trap 'rm -f "$stripped"' EXIT
  "$triplet-strip" -o "$stripped" "$binary"
  echo "built $binary"
  echo "size: $(stat -c %s "$binary") bytes, stripped $(stat -c %s "$stripped") bytes"
else
  cargo build --locked --target "$target" "$@"
fi
