#!/usr/bin/env bash
# Install promtool (from Debian's `prometheus` package, unpacked, cached) and print its path.
#
#   bash scripts/tools/promtool.sh      # prints ~/.cache/e2ee-relay/promtool/<version>/usr/bin/promtool
#
# The package is fetched with `apt-get download` and unpacked with `dpkg -x`: nothing is
# installed system-wide and no service starts. The tests call it (tests/test_metrics.py)
# to check a live scrape (`promtool check metrics`) and deploy/prometheus/alerts.yml
# (`promtool check rules`). After the first run it works offline.
set -euo pipefail

CACHE="${RELAY_PROMTOOL_DIR:-$HOME/.cache/e2ee-relay/promtool}"

# The cached copy, if any, is good offline: pick the newest unpacked version.
cached() {
    local found
    found=$(ls -d "$CACHE"/*/usr/bin/promtool 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$found" && -x "$found" ]] && echo "$found"
}

if tool=$(cached); then
    echo "$tool"
    exit 0
fi

for cmd in apt-get dpkg; do
    if ! command -v "$cmd" >/dev/null; then
        echo "scripts/tools/promtool.sh: promtool comes from Debian's prometheus package, and $cmd is not on PATH" >&2
        exit 1
    fi
done

version=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
if [[ -z "$version" || "$version" == "(none)" ]]; then
    echo "scripts/tools/promtool.sh: no prometheus package known to apt; running apt-get update once" >&2
    apt-get update -qq >&2
    version=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
fi
if [[ -z "$version" || "$version" == "(none)" ]]; then
    echo "scripts/tools/promtool.sh: apt knows no prometheus package (is a Debian mirror reachable?)" >&2
    exit 1
fi

echo "fetching promtool from Debian's prometheus $version into $CACHE (once; cached)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt's _apt user writes the download there
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "prometheus=$version" >&2)
dir="$CACHE/${version//[^A-Za-z0-9.+_-]/_}"
mkdir -p "$CACHE"
tmp="$work/unpacked"
dpkg -x "$work"/prometheus_*.deb "$tmp"
# Keep promtool only: the server binary and the rest are not needed.
find "$tmp" -mindepth 1 -not -path "$tmp/usr" -not -path "$tmp/usr/bin" \
    -not -path "$tmp/usr/bin/promtool" -delete
# Another run may have finished first (tests start in parallel): keep whichever landed.
mv -T "$tmp" "$dir" 2>/dev/null || [[ -x "$dir/usr/bin/promtool" ]]
"$dir/usr/bin/promtool" --version >/dev/null
echo "$dir/usr/bin/promtool"
