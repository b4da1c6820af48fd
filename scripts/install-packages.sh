#!/usr/bin/env bash
# Installs the named Debian packages that are not installed yet, with apt-get (through sudo
# when not root). Checking first keeps repeated runs fast: apt-get update is the slow part.
# A name qualified with a foreign architecture (libgstreamer1.0-dev:arm64) adds that
# architecture to dpkg first (multiarch).
set -euo pipefail

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

missing=()
added=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  for package in "${missing[@]}"; do
    case "$package" in
      *:*)
        arch=${package##*:}
        if [ "$arch" != "$(dpkg --print-architecture)" ] \
          && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
          echo "adding the $arch architecture to dpkg (multiarch)"
          $sudo dpkg --add-architecture "$arch"
          added+=("$arch")
        fi ;;
    esac
  done
  echo "installing: ${missing[*]}"
  if ! $sudo apt-get update -qq; then
    # An architecture the configured archives do not carry (e.g. arm64 on an Ubuntu host, whose
    # ARM packages live elsewhere) breaks every later update: take it back out.
    for arch in "${added[@]}"; do $sudo dpkg --remove-architecture "$arch"; done
    echo "error: apt-get update failed${added:+ after adding ${added[*]}, removed again}" >&2
    exit 1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
fi
