#!/usr/bin/env bash
# Extracts Debian's systemd-resolved package into DEST (default
# .venv/systemd-resolved) for tests/test_e2e_resolved.py, which runs a real
# systemd-resolved inside a test host's namespaces. The package is NEVER
# installed: its postinst would make /etc/resolv.conf a link to a stub that
# nothing serves on a machine without systemd. Optional: the test is skipped
# without it.
set -euo pipefail
dest=${1:-.venv/systemd-resolved}
[ -x "$dest/lib/systemd/systemd-resolved" ] && exit 0
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "the systemd-resolved test needs Debian's systemd-resolved package extracted in $dest (skipped without it)" >&2
    exit 0
fi
# The same version as the installed libsystemd-shared, which the binaries link against.
version=$(dpkg-query -W -f '${Version}' libsystemd-shared 2>/dev/null || true)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"  # apt's sandbox user writes the download here
if ! (cd "$work" && apt-get download -qq "systemd-resolved${version:+=$version}" 2>/dev/null); then
    echo "cannot download systemd-resolved ${version}: the systemd-resolved test will be skipped" >&2
    exit 0
fi
mkdir -p "$dest.tmp"
dpkg-deb -x "$work"/systemd-resolved_*.deb "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "extracted systemd-resolved ${version} into $dest (not installed)" >&2
