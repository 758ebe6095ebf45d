#!/usr/bin/env bash
# Install Debian's Chromium, which the report tests use as a real headless browser.
#
# Idempotent: exits at once when it is already installed. Needs root to install.
set -euo pipefail

status=$(dpkg-query -W -f='${Status}' chromium 2>/dev/null || true)
if [ "$status" = "install ok installed" ]; then
    echo "install-chromium: already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: must run as root to install chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: installing chromium"
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "install-chromium: done"
