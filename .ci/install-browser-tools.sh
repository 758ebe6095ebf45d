#!/usr/bin/env bash
# Install the Debian packages that the tests drive as a person would: Chromium (a real headless
# browser opens the HTML report) and tmux (a real terminal for `status --watch`).
#
# Idempotent: exits at once when every package is installed. Needs root to install.
set -euo pipefail

packages=(chromium tmux)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-browser-tools: already installed (${packages[*]})"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser-tools: must run as root to install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-browser-tools: installing ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-browser-tools: done"
