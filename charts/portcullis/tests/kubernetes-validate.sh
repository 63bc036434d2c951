#!/usr/bin/env bash
# Installs the PyPI package kubernetes-validate, which bundles the Kubernetes JSON schemas
# of every release from 1.25 to 1.37, into a cached virtualenv and prints the path of that
# virtualenv's python on stdout. validate.py runs with it.
#
# Usage: charts/portcullis/tests/kubernetes-validate.sh
#   PORTCULLIS_CACHE   cache folder (default: $HOME/.cache/portcullis)
#
# Wheels are kept in $PORTCULLIS_CACHE/kubernetes-validate/wheels, so that a reinstall needs
# no network. Progress and errors go to stderr; the exit status is non-zero on failure.
set -euo pipefail

REQUIREMENT='kubernetes-validate==1.37.0'

cache_dir="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
install_dir="$cache_dir/kubernetes-validate"
venv_dir="$install_dir/venv"
wheel_dir="$install_dir/wheels"
python="$venv_dir/bin/python"

fail() {
    echo "kubernetes-validate.sh: $*" >&2
    exit 1
}

is_installed() {
    [ -x "$python" ] && "$python" -c 'import kubernetes_validate, sys; sys.exit(kubernetes_validate.version.__version__ != sys.argv[1])' \
        "${REQUIREMENT##*==}" 2>/dev/null
}

if is_installed; then
    echo "$python"
    exit 0
fi

command -v python3 >/dev/null || fail "python3 not found; install Python 3 with the venv module"
mkdir -p "$wheel_dir" || fail "cannot create the cache folder $install_dir"
if [ ! -x "$python" ]; then
    echo "kubernetes-validate.sh: creating the virtualenv $venv_dir" >&2
    python3 -m venv "$venv_dir" >&2 || fail "python3 -m venv $venv_dir failed"
fi
pip=("$python" -m pip --disable-pip-version-check --quiet)

if ! "${pip[@]}" install --no-index --find-links "$wheel_dir" "$REQUIREMENT" >&2 2>/dev/null; then
    echo "kubernetes-validate.sh: downloading $REQUIREMENT and its dependencies into $wheel_dir" >&2
    "${pip[@]}" download --dest "$wheel_dir" "$REQUIREMENT" >&2 \
        || fail "pip download $REQUIREMENT failed (see the pip output above)"
    "${pip[@]}" install --no-index --find-links "$wheel_dir" "$REQUIREMENT" >&2 \
        || fail "pip install $REQUIREMENT from $wheel_dir failed (see the pip output above)"
fi

is_installed || fail "$REQUIREMENT is installed in $venv_dir but cannot be imported"
echo "$python"
