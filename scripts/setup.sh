#!/usr/bin/env bash
# Fresh-machine setup for napari-discreg (Debian, Python >= 3.10).
#   bash scripts/setup.sh            -> system libraries + .venv with the GUI and test extras
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# System libraries Qt 6 (xcb platform), OpenGL (vispy) and Xvfb need.
APT_PKGS="xvfb xauth libgl1 libegl1 libopengl0 libglib2.0-0 libdbus-1-3 libfontconfig1 \
libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1 \
libx11-xcb1 libxrender1 libxi6"
if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# constraints.txt pins torch to the CPU wheel; every install goes through it.
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[pyqt6,test,dev,peers]"
echo "napari-discreg environment ready in $VENV"
