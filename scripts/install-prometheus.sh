#!/usr/bin/env bash
# Install Debian's prometheus and promtool binaries into ./.tools/prometheus/ (idempotent).
#
#   .tools/bin/prometheus, .tools/bin/promtool   links into .tools/prometheus/usr/bin/
#
# The .deb is fetched with `apt-get download` and unpacked with `dpkg -x`: no dependencies
# (both binaries are Go programs needing only libc), no system user, no service started, nothing
# outside .tools/. tests/integration/test_observability.py runs them against a live worker
# and trainer. Takes ~5 s on a fresh machine (one ~30 MB download, plus `apt-get update`
# when the package lists are missing), well under 1 s when present.
# Settings (environment): PROMETHEUS_DEB_VERSION (default: the candidate of this Debian).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/.tools"
DEST="$TOOLS/prometheus"
BIN="$TOOLS/bin"

log() { printf '[install-prometheus] %s\n' "$*" >&2; }

if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]] && "$BIN/promtool" --version >/dev/null 2>&1; then
  log "present: $("$BIN/prometheus" --version 2>&1 | head -1)"
  exit 0
fi
command -v apt-get >/dev/null || { log "apt-get not found: install prometheus by hand"; exit 1; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi; }

spec="prometheus${PROMETHEUS_DEB_VERSION:+=$PROMETHEUS_DEB_VERSION}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download "$spec" >/dev/null 2>&1; then
  log "package lists stale or missing: apt-get update"
  as_root apt-get update -qq
  apt-get download "$spec"
fi
deb=$(ls prometheus_*.deb)
log "unpacking $deb into $DEST"
rm -rf "$DEST"
mkdir -p "$DEST" "$BIN"
dpkg -x "$deb" "$DEST"
ln -sfn ../prometheus/usr/bin/prometheus "$BIN/prometheus"
ln -sfn ../prometheus/usr/bin/promtool "$BIN/promtool"
log "installed: $("$BIN/prometheus" --version 2>&1 | head -1)"
