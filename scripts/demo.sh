#!/usr/bin/env bash
# Installs what the demo needs (scripts/setup.sh, without helm) and plays one VM start locally:
# webhook over HTTPS, Pod mutation, prepare with real qcow2 images, sidecar over gRPC, the node agent
# recording the home node, and a disk grown online in a real (TCG) libvirt domain. No cluster; as root.
# Options: --keep (keep the temp directory)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-helm
exec .venv/bin/python -m scripts.demo "$@"
