#!/usr/bin/env bash
# Install the Debian packages the tests drive as a person would: Slurm and munge for the loopback
# test cluster, Chromium (a real headless browser opens the HTML report) and tmux (a real
# terminal for `status --watch`).
#
# Idempotent: exits at once when every package is already installed, so CI can call it on
# every run. Needs root (CI and developer machines run as root). No service is started here:
# slurm/testcluster/cluster.py starts and stops the daemons itself, with its own munge key and
# socket, so the /etc/munge/munge.key made by the package is not used.
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client chromium tmux)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-packages: already installed (${packages[*]})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-packages: must run as root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-test-packages: installing ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

echo "install-test-packages: done"
