#!/usr/bin/env bash
# Installs Envoy 1.40 (tests/peers/envoy.sh, cached under $HOME/.cache/portcullis) and runs
# it in the foreground with deploy/local/envoy.yaml. Extra arguments go to Envoy, for
# example `deploy/local/run-envoy.sh --log-level debug`. Stop it with Ctrl-C.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
envoy="$(bash "$repo_root/tests/peers/envoy.sh")"

# --disable-hot-restart: a second Envoy (such as one started by the end-to-end tests) would
# otherwise fail on the shared-memory region of the first.
exec "$envoy" --config-path "$repo_root/deploy/local/envoy.yaml" --disable-hot-restart "$@"
