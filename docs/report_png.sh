#!/usr/bin/env bash
# Render a run's report.html to a PNG with headless Chromium (Debian: apt-get install chromium),
# e.g. the README picture:   docs/report_png.sh runs/demo docs/report.png
set -euo pipefail
run=${1:-runs/demo}
out=${2:-docs/report.png}
height=${3:-2400}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1250,"$height" --screenshot="$(realpath -m "$out")" "file://$(realpath "$run")/report.html" 2>/dev/null
echo "wrote $out"
