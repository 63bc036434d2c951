#!/usr/bin/env bash
# Installs Keycloak 26 from the Maven Central artifact `org.keycloak:keycloak-quarkus-dist` (zip)
# into the cache and prints the Keycloak home folder (the one holding bin/kc.sh) on stdout.
#
# Usage: tests/peers/keycloak.sh
#   PORTCULLIS_CACHE    cache folder (default: $HOME/.cache/portcullis)
#   KEYCLOAK_VERSION    version to install (default below)
#
# The zip is kept in $PORTCULLIS_CACHE/keycloak so that a later install needs no network, and it
# is unpacked once. A second run with Keycloak already unpacked prints only the path. Running
# Keycloak 26 needs Java 21 or newer, which this script does not install. Progress and errors go to
# stderr; the exit status is non-zero when Keycloak cannot be installed.
set -euo pipefail

KEYCLOAK_VERSION="${KEYCLOAK_VERSION:-26.5.6}"
cache_dir="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
keycloak_dir="$cache_dir/keycloak"
zip_path="$keycloak_dir/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip"
home="$keycloak_dir/keycloak-$KEYCLOAK_VERSION"

fail() {
    echo "keycloak.sh: $*" >&2
    exit 1
}

if [ -x "$home/bin/kc.sh" ]; then
    echo "$home"
    exit 0
fi

mkdir -p "$keycloak_dir" || fail "cannot create the cache folder $keycloak_dir"

if [ ! -s "$zip_path" ]; then
    command -v mvn >/dev/null || fail "mvn not found; install Maven to download Keycloak $KEYCLOAK_VERSION"
    echo "keycloak.sh: downloading org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip into $keycloak_dir" >&2
    mvn --batch-mode --quiet dependency:copy \
        "-Dartifact=org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" \
        "-DoutputDirectory=$keycloak_dir" >&2 \
        || fail "mvn dependency:copy of org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip failed (see the Maven output above)"
    [ -s "$zip_path" ] || fail "Maven finished but $zip_path is missing"
fi

command -v unzip >/dev/null || command -v python3 >/dev/null \
    || fail "neither unzip nor python3 found; install one of them to unpack $zip_path"

# Unpack into a temporary folder first so that an interrupted run leaves no half-unpacked home.
staging="$(mktemp -d "$keycloak_dir/unpack.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
echo "keycloak.sh: unpacking $zip_path" >&2
if command -v unzip >/dev/null; then
    unzip -q "$zip_path" -d "$staging" >&2 || fail "unzip $zip_path failed"
else
    python3 -m zipfile -e "$zip_path" "$staging" >&2 || fail "unpacking $zip_path with python3 failed"
fi
[ -f "$staging/keycloak-$KEYCLOAK_VERSION/bin/kc.sh" ] \
    || fail "$zip_path does not contain keycloak-$KEYCLOAK_VERSION/bin/kc.sh"
chmod +x "$staging/keycloak-$KEYCLOAK_VERSION/bin/"*.sh
rm -rf "$home"
mv "$staging/keycloak-$KEYCLOAK_VERSION" "$home"

echo "keycloak.sh: installed Keycloak $KEYCLOAK_VERSION in $home" >&2
echo "$home"
