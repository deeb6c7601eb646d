#!/usr/bin/env bash
# System pieces from Debian: libcairo2 (cairosvg rasterises OpenMoji and Tux Paint SVGs), npm (fetches
# the emoji packages and KaTeX for the docs), chromium (the docs test). Installs only what is missing.
set -euo pipefail
missing=()
dpkg -s libcairo2 >/dev/null 2>&1 || missing+=(libcairo2)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the docs test looks at the site in a real browser
{ command -v python3 >/dev/null 2>&1 && python3 -c "import ensurepip, venv" 2>/dev/null; } || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root or 'sudo apt-get install ${missing[*]}'" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# `apt-get download` needs package lists; fetch them once if this machine never did.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq; else echo "setup: run 'sudo apt-get update' once" >&2; fi
fi
