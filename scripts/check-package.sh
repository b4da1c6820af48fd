#!/usr/bin/env bash
# Checks an edgesight .deb: its contents and metadata, lintian's verdict, and (for a package of
# this machine's architecture, as root) a real install: every file where the unit expects it,
# the account and state directories made, the unit verified by systemd-analyze, the daemon
# binary working as the service account; then a purge that must leave nothing behind.
#
#   scripts/check-package.sh path/to/edgesight_<version>_<arch>.deb
#
# The install step is skipped, with a line saying so, when this is not root (and sudo would ask
# for a password), when the package's architecture is not this machine's, or when edgesight is
# already installed here (the check must not replace or purge a real installation).
set -euo pipefail
deb=$(realpath "${1:?usage: scripts/check-package.sh DEB}")

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

arch=$(dpkg-deb --field "$deb" Architecture)
echo "== $deb ($arch)"

# 1. Contents: what the unit, its companions and the documentation need.
listing=$(dpkg-deb --contents "$deb")
contents=$(awk '{ print $6 }' <<< "$listing")
expected=(
  ./usr/bin/edgesight
  ./usr/lib/systemd/system/edgesight.service
  ./usr/lib/sysusers.d/edgesight.conf
  ./usr/lib/tmpfiles.d/edgesight.conf
  ./etc/edgesight/edgesight.toml
  ./etc/default/edgesight
  ./usr/share/doc/edgesight/README.md
  ./usr/share/doc/edgesight/copyright
  ./usr/share/doc/edgesight/examples/v4l2.toml
  ./usr/share/doc/edgesight/schema/classification.schema.json
)
for path in "${expected[@]}"; do
  grep -qx "$path" <<< "$contents" || fail "the package lacks $path"
done
control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT
dpkg-deb --control "$deb" "$control"
for conffile in /etc/edgesight/edgesight.toml /etc/default/edgesight; do
  grep -qx "$conffile" "$control/conffiles" || fail "$conffile is not a conffile"
done
grep -Eq '^-rw------- (root/root|0/0) .* ./etc/default/edgesight$' <<< "$listing" \
  || fail "/etc/default/edgesight (it may hold a broker password) is not 0600 root"
echo "contents: ${#expected[@]} expected paths present"
echo "conffiles: $(tr '\n' ' ' < "$control/conffiles")"
echo "depends: $(dpkg-deb --field "$deb" Depends)"

# 2. lintian, when installed: errors fail the check; warnings and notes are printed.
if command -v lintian > /dev/null; then
  findings=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root' || true)
  if [ -n "$findings" ]; then printf 'lintian:\n%s\n' "$findings"; else echo "lintian: clean"; fi
  if grep -q '^E: ' <<< "$findings"; then fail "lintian reports errors"; fi
else
  echo "lintian: not installed, skipped"
fi

# 3. A real install and purge.
sudo=()
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2> /dev/null; then sudo=(sudo); else
    echo "install: skipped (needs root or password-less sudo)"
    exit 0
  fi
fi
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  echo "install: skipped (an $arch package; this machine is $(dpkg --print-architecture))"
  exit 0
fi
# Any state dpkg knows besides not-installed (installed, or removed with its conffiles and state
# kept, or half-installed) belongs to somebody: the check's purge would delete it.
state=$(dpkg-query -W -f='${db:Status-Status}' edgesight 2> /dev/null || true)
if [ -n "$state" ] && [ "$state" != not-installed ]; then
  echo "install: skipped (edgesight is known to dpkg here, state '$state'; the check would" \
    "replace and purge it)"
  exit 0
fi

had_account=false
if getent passwd edgesight > /dev/null; then had_account=true; fi
cleanup() {
  "${sudo[@]}" dpkg --purge edgesight > /dev/null 2>&1 || true
  if ! $had_account && getent passwd edgesight > /dev/null; then
    "${sudo[@]}" userdel edgesight 2> /dev/null || true
    "${sudo[@]}" groupdel edgesight 2> /dev/null || true
  fi
  rm -rf "$control"
}
trap cleanup EXIT

"${sudo[@]}" dpkg -i "$deb" > "$control/install.log" 2>&1 \
  || { cat "$control/install.log"; fail "dpkg -i failed"; }
/usr/bin/edgesight --version > /dev/null || fail "/usr/bin/edgesight does not run"

getent passwd edgesight > /dev/null || fail "the edgesight account was not made"
id -nG edgesight | grep -qw video || fail "edgesight is not in the video group"
for dir in /var/lib/edgesight /var/lib/edgesight/models /var/lib/edgesight/spool; do
  [ "$(stat -c '%U:%G %a' "$dir")" = "edgesight:edgesight 750" ] \
    || fail "$dir is $(stat -c '%U:%G %a' "$dir" 2>&1), not edgesight:edgesight 750"
done

# Every path the unit names exists; systemd's own check of the unit (ExecStart, User=, …).
unit=/usr/lib/systemd/system/edgesight.service
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
read -r binary _ <<< "$exec_start"
config=$(sed -n 's/.*--config \([^ ]*\).*/\1/p' <<< "$exec_start")
[ -x "$binary" ] || fail "ExecStart names $binary, which is not installed"
[ -f "$config" ] || fail "ExecStart reads $config, which is not installed"
verify=$(systemd-analyze verify "$unit" 2>&1 || true)
[ -z "$verify" ] || fail "systemd-analyze verify $unit: $verify"
enabled=$(systemctl is-enabled edgesight.service 2>&1 || true)
[ "$enabled" = disabled ] \
  || fail "the service is '$enabled' after install; it must wait, disabled, for its configuration"

# The packaged configuration is refused until it names a stream (exit 2, which systemd does not
# restart), and the service account can write a bundle into its state directory.
checked=$("${sudo[@]}" runuser -u edgesight -- /usr/bin/edgesight config check "$config" 2>&1) \
  && fail "config check accepted the packaged configuration, which names no stream"
grep -q 'at least one \[\[streams\]\]' <<< "$checked" \
  || fail "config check of the packaged configuration: $checked"
"${sudo[@]}" runuser -u edgesight -- /usr/bin/edgesight model synth --input-size 64 \
  --out /var/lib/edgesight/models/default > /dev/null \
  || fail "the edgesight account cannot write a bundle to /var/lib/edgesight/models"
"${sudo[@]}" runuser -u edgesight -- /usr/bin/edgesight model verify \
  /var/lib/edgesight/models/default > /dev/null || fail "the bundle written there does not verify"
echo "install: files in place, account and state directories made, unit verified, disabled;" \
  "the packaged configuration asks for a stream"

"${sudo[@]}" dpkg --purge edgesight > "$control/purge.log" 2>&1 \
  || { cat "$control/purge.log"; fail "dpkg --purge failed"; }
for path in /usr/bin/edgesight "$unit" /etc/edgesight/edgesight.toml /etc/default/edgesight \
  /var/lib/edgesight; do
  [ ! -e "$path" ] || fail "$path is still there after the purge"
done
echo "purge: nothing left behind"
echo "ok: $(basename "$deb")"
