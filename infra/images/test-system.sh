#!/usr/bin/env bash
# What `make test` needs beyond the venv: Debian's Chromium, which the report tests drive through
# Playwright (/usr/bin/chromium). Installed from Debian when missing (as root, or with sudo when
# it needs no password); otherwise stop before the suite runs, with the command to run.
set -euo pipefail

command -v chromium >/dev/null 2>&1 && exit 0

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    echo "make test: the report tests need Debian's Chromium (/usr/bin/chromium), which is" >&2
    echo "missing. Install it, then run make test again:" >&2
    echo "    sudo apt-get install -y --no-install-recommends chromium" >&2
    exit 2
  fi
  SUDO="sudo -n"
fi
echo "make test: installing Debian's chromium (the report tests drive it)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
