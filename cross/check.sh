#!/usr/bin/env bash
# Runs the cross-built ARM binary under qemu-user and compares it with the x86-64 build.
#
#   cross/check.sh aarch64|armv7 [--input-size N]     N: the synthetic model's input, default 64
#
# Steps, each on both binaries where it applies: `model synth` with the same seed (the two
# bundles must have the same checksums), `model verify`, and `classify --json` on corpus images
# and two videos (MJPEG in AVI, VP8 in WebM). Every input must give the same rows and top-1
# labels, with scores within 1e-4. Prints the largest score difference and both classify times;
# the ARM time is emulated (qemu translating ARM code on this x86 machine), not a board's.
# qemu emulates a Raspberry Pi 4's core (Cortex-A72) for aarch64 and a Cortex-A15 (ARMv7 with
# NEON and VFPv4) for armv7, so tract picks the kernels it would pick there; QEMU_CPU overrides.
#
# Needs the corpus (EDGESIGHT_CORPUS or ../shared/corpus), the x86 binary (the dev-profile build
# the tests use, `cargo build --bin edgesight`, unless EDGESIGHT_X86_BIN names another) and the
# ARM binary (built with cross/build.sh unless EDGESIGHT_ARM_BIN names one). Installs qemu-user and the target's
# GStreamer plugins (base, good) from Debian's multiarch archive when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  aarch64 | aarch64-unknown-linux-gnu)
    target=aarch64-unknown-linux-gnu arch=arm64 qemu=qemu-aarch64 cpu=cortex-a72 ;;
  armv7 | armv7-unknown-linux-gnueabihf)
    target=armv7-unknown-linux-gnueabihf arch=armhf qemu=qemu-arm cpu=cortex-a15 ;;
  *)
    echo "usage: cross/check.sh aarch64|armv7 [--input-size N]" >&2
    exit 2 ;;
esac
shift
# 64 keeps the emulated run near two minutes; 224 (the real size) takes about ten.
input_size=64
if [ "${1:-}" = "--input-size" ]; then
  input_size=${2:?--input-size needs a value}
  shift 2
fi

cache="${EDGESIGHT_CACHE:-$HOME/.cache/edgesight}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
corpus="${EDGESIGHT_CORPUS:-$(pwd)/../shared/corpus}"
if [ ! -f "$corpus/FILES.md" ]; then
  echo "error: the media corpus is not at $corpus; set EDGESIGHT_CORPUS to its directory" >&2
  exit 1
fi

scripts/install-packages.sh qemu-user python3 "gstreamer1.0-plugins-base:$arch" \
  "gstreamer1.0-plugins-good:$arch"

arm_bin="${EDGESIGHT_ARM_BIN:-}"
if [ -z "$arm_bin" ]; then
  cross/build.sh "$target"
  arm_bin="$CARGO_TARGET_DIR/$target/release/edgesight"
fi
x86_bin="${EDGESIGHT_X86_BIN:-}"
if [ -z "$x86_bin" ]; then
  cargo build --locked --bin edgesight
  x86_bin="$CARGO_TARGET_DIR/debug/edgesight"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# GStreamer scans its plugins in a helper process it execs; an ARM helper cannot be exec'd
# without binfmt_misc, so the scan runs inside the emulated process, with its own registry.
# tract's CPU detection reads the host's /proc/cpuinfo under qemu and warns that it has no ARM
# "Features" line; that warning is silenced.
arm() {
  GST_REGISTRY_FORK=no GST_REGISTRY="$work/registry-$arch.bin" QEMU_CPU="${QEMU_CPU:-$cpu}" \
    RUST_LOG="${RUST_LOG:-warn,tract_linalg=error}" "$qemu" -L / "$arm_bin" "$@"
}
x86() { "$x86_bin" "$@"; }
# Seconds since an $EPOCHREALTIME reading.
since() { awk "BEGIN { printf \"%.3f\", $EPOCHREALTIME - $1 }"; }

images=(img_progressive_cat.jpg img_webp_hopper.webp img_png_widescreen.png img_jpeg_gray.jpg
  img_exif_hopper_orientation_6.jpg img_png16_rgb_basn2c16.png img_gif_hopper.gif)
videos=(vid_mjpeg_160x120.avi vid_vp8_vorbis_1280x720.webm)
inputs=()
for name in "${images[@]}" "${videos[@]}"; do inputs+=("$corpus/$name"); done

echo "== $target under $qemu (cpu ${QEMU_CPU:-$cpu}): $arm_bin"
echo "-- model synth (seed 7, input $input_size) on both"
x86 model synth --out "$work/x86-bundle" --seed 7 --input-size "$input_size" > /dev/null
start=$EPOCHREALTIME
arm model synth --out "$work/arm-bundle" --seed 7 --input-size "$input_size" > /dev/null
synth_s=$(since "$start")
python3 cross/compare.py bundles "$work/x86-bundle" "$work/arm-bundle"

echo "-- model verify on the ARM binary"
arm model verify "$work/x86-bundle"

echo "-- classify ${#images[@]} images and ${#videos[@]} videos (1 frame/s) on both"
start=$EPOCHREALTIME
x86 classify --json --threads 1 --model "$work/x86-bundle" "${inputs[@]}" > "$work/x86.jsonl"
x86_s=$(since "$start")
start=$EPOCHREALTIME
arm classify --json --threads 1 --model "$work/x86-bundle" "${inputs[@]}" > "$work/arm.jsonl"
arm_s=$(since "$start")
python3 cross/compare.py rows "$work/x86.jsonl" "$work/arm.jsonl" 1e-4

frames=$(grep -c '"label"' "$work/x86.jsonl")
printf 'times (%s frames, 1 thread, input %s): x86-64 %s build %.1f s; %s emulated %.1f s ' \
  "$frames" "$input_size" "$(basename "$(dirname "$x86_bin")")" "$x86_s" "$target" "$arm_s"
printf '(%.2f s/frame); emulated synth %.1f s\n' "$(awk "BEGIN { print $arm_s / $frames }")" \
  "$synth_s"
echo "ok: $target agrees with x86-64"
