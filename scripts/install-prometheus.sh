#!/usr/bin/env bash
# Install Debian's Prometheus server and promtool, pinned to the tested version (idempotent).
#
# The monitoring tests start this Prometheus on 127.0.0.1 with a temporary data folder and
# run `promtool check` and `promtool test rules`. The Debian package is used because
# prometheus.io is not reachable from the build machines. apt checks each package against
# the archive's signed Release file, so no separate checksum is pinned here.
# The package's systemd service is not started: tests run the binary themselves.
#
# Usage: sudo scripts/install-prometheus.sh   (needs root; Debian 12 "bookworm")
set -euo pipefail

readonly PROMETHEUS_VERSION="2.42.0+ds-5+deb12u1"

installed="$(dpkg-query --showformat='${Version}' --show prometheus 2>/dev/null || true)"
if [[ "${installed}" == "${PROMETHEUS_VERSION}" ]] && command -v promtool >/dev/null; then
    echo "prometheus ${PROMETHEUS_VERSION} already installed"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: installing prometheus ${PROMETHEUS_VERSION} needs root; rerun with sudo" >&2
    exit 1
fi

echo "installing prometheus ${PROMETHEUS_VERSION} from the Debian archive"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d exit code 101 stops the package's post-install script from starting the service.
policy="/usr/sbin/policy-rc.d"
created_policy=0
if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "${policy}"
    chmod 0755 "${policy}"
    created_policy=1
fi
trap '[[ ${created_policy} -eq 1 ]] && rm -f "${policy}"' EXIT
apt-get install -y -qq --no-install-recommends "prometheus=${PROMETHEUS_VERSION}"

echo "installed $(prometheus --version 2>&1 | head -n 1)"
