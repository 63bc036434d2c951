#!/usr/bin/env bash
# Installs OPA from the Go module proxy into the cache and prints the binary's path.
# OPA is the reference implementation that the differential tests compare portcullis with.
set -euo pipefail

OPA_VERSION="${OPA_VERSION:-v1.22.4}"
cache="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
bin="$cache/bin/opa"

if [[ -x "$bin" ]] && "$bin" version 2>/dev/null | grep -q "^Version: ${OPA_VERSION#v}$"; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null; then
  echo "opa.sh: Go is not installed; install Go to build OPA $OPA_VERSION" >&2
  exit 1
fi
mkdir -p "$cache/bin"
echo "opa.sh: building OPA $OPA_VERSION (a few minutes the first time)" >&2
if ! GOBIN="$cache/bin" go install "github.com/open-policy-agent/opa@$OPA_VERSION" >&2; then
  echo "opa.sh: building OPA $OPA_VERSION failed" >&2
  exit 1
fi
echo "$bin"
