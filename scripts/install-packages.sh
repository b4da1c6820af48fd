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
  # A mirror caught mid-sync serves an index of the wrong size ("Mirror sync in progress?") for a
  # minute or two: apt-get update is retried with pauses. When it still fails, the install is
  # tried on the indexes apt did get (an update that fails on one security index leaves the main
  # ones usable); only a failed install is an error.
  updated=no
  for pause in 0 20 60 120; do
    if [ "$pause" != 0 ]; then
      echo "apt-get update failed; retrying in $pause s" >&2
      sleep "$pause"
    fi
    if $sudo apt-get -o Acquire::Retries=3 update -qq; then
      updated=yes
      break
    fi
  done
  if [ "$updated" = no ]; then
    echo "warning: apt-get update kept failing; installing from the indexes apt has" >&2
  fi
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq \
    --no-install-recommends "${missing[@]}"; then
    # An architecture the configured archives do not carry (e.g. arm64 on an Ubuntu host, whose
    # ARM packages live elsewhere) breaks every later update: take it back out.
    # (dpkg refuses while packages of that architecture are installed; then it stays.)
    for arch in "${added[@]}"; do
      $sudo dpkg --remove-architecture "$arch" || echo "warning: $arch stays in dpkg" >&2
    done
    reason=""
    if [ "$updated" = no ]; then reason=" (apt-get update kept failing before it)"; fi
    echo "error: apt-get install failed$reason" >&2
    exit 1
  fi
fi
