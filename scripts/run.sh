#!/usr/bin/env bash
# Set up a fresh machine and run the main job.
#  - with a screen (DISPLAY set): napari with the napari-discreg widgets and the sample pair;
#  - without one: a headless run that registers the sample pair and writes a report
#    (PNG + JSON + Markdown) to ./report (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; then
  exec .venv/bin/python -m napari_discreg._app
else
  out=${1:-report}
  exec .venv/bin/napari-discreg demo -o "$out"
fi
