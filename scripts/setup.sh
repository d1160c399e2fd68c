#!/usr/bin/env bash
# Sets up anomalyd on a fresh Debian/Ubuntu machine: system packages (as root, or through sudo), a virtual
# environment with the project installed editable, and nothing else. Safe to re-run: it skips what is done.
#   scripts/setup.sh          runtime only (an MQTT broker is optional and not installed)
#   scripts/setup.sh --test   also the services and browser the test suite starts (Mosquitto and its clients, Redis,
#                             PostgreSQL, Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-$HOME/.cache/anomalyd/venv}
PYTHON=${PYTHON:-python3}
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

if command -v apt-get >/dev/null; then
  apt_install python3-venv
  if [[ $want_test -eq 1 ]]; then
    # mosquitto-clients: mosquitto_pub/mosquitto_sub, which the docs use; systemd: systemd-analyze verify of the unit
    apt_install mosquitto mosquitto-clients redis-server postgresql chromium systemd
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# Reinstall only when the dependency list changed or the project moved (an editable install points at this tree).
stamp="$VENV/.anomalyd-$(cat pyproject.toml | sha256sum | cut -c1-16)-$(pwd | sha256sum | cut -c1-8)"
if [[ ! -f "$stamp" ]]; then
  echo "setup: installing anomalyd and its dependencies into $VENV (torch is large: this takes a while)"
  "$VENV/bin/pip" install -q -e '.[dev]'
  rm -f "$VENV"/.anomalyd-*
  touch "$stamp"
fi
echo "setup: ready ($VENV)"
