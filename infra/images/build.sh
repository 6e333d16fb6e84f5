#!/usr/bin/env bash
# Build the project image (make image). Flags are environment variables, documented in
# infra/images/README.md. DESIGN 6.2: no registry image is pulled; the Debian base is made
# with debootstrap and imported once, then the Containerfile builds on it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The tag the compiled components name: $CTA_IMAGE, else components/image.py's default.
IMAGE="${CTA_IMAGE:-$(sed -n 's/^DEFAULT_IMAGE = "\(.*\)"$/\1/p' "$ROOT/components/image.py")}"
[[ -n "$IMAGE" ]] || { echo "[image] error: no DEFAULT_IMAGE in components/image.py" >&2; exit 2; }
BASE_IMAGE="${CTA_BASE_IMAGE:-localhost/cta-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WORK="${CTA_IMAGE_WORK:-$ROOT/.cta/image}"
BUILDER="${BUILDER:-}"
# cpu: the pinned torch==2.13.0+cpu from the local wheels; cuda: the same torch release's CUDA
# build from the package index (make image-gpu), every other pin unchanged.
TORCH_BUILD="${TORCH_BUILD:-cpu}"
BASE_PACKAGES="python3,python3-venv,python3-psycopg2,ca-certificates,passwd"

log() { echo "[image] $*" >&2; }
die() { echo "[image] error: $*" >&2; exit 2; }

if [[ -z "$BUILDER" ]]; then
  if command -v buildah >/dev/null 2>&1; then
    BUILDER=buildah
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    BUILDER=docker
  else
    die "neither buildah nor a working docker (client + daemon) found; run 'make setup-system'"
  fi
fi
case "$BUILDER" in buildah|docker) ;; *) die "BUILDER=$BUILDER: expected buildah or docker" ;; esac
case "$TORCH_BUILD" in cpu|cuda) ;; *) die "TORCH_BUILD=$TORCH_BUILD: expected cpu or cuda" ;; esac
[[ -f "$CA_BUNDLE" ]] || die "CA_BUNDLE=$CA_BUNDLE: no such file"
[[ "$TORCH_BUILD" == cuda || -d "$FIND_LINKS" ]] \
  || die "PIP_FIND_LINKS=$FIND_LINKS: no such folder (it holds the torch CPU wheel)"

image_exists() {
  if [[ "$BUILDER" == buildah ]]; then buildah inspect --type image "$1" >/dev/null 2>&1
  else docker image inspect "$1" >/dev/null 2>&1; fi
}

# 1. The base: a minimal Debian root filesystem, imported as an image (once).
if image_exists "$BASE_IMAGE"; then
  log "base $BASE_IMAGE exists"
else
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found; run 'make setup-system'"
  [[ "$(id -u)" == 0 ]] || die "debootstrap needs root (run 'sudo make image' or build the base once as root)"
  rootfs="$WORK/rootfs-$SUITE"
  if [[ ! -f "$rootfs/.complete" ]]; then
    log "debootstrap $SUITE from $MIRROR into $rootfs (a few minutes)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    touch "$rootfs/.complete"
  fi
  log "importing $rootfs as $BASE_IMAGE"
  if [[ "$BUILDER" == buildah ]]; then
    container="$(buildah from scratch)"
    buildah copy --quiet "$container" "$rootfs" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd /bin/bash "$container"
    buildah commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
  else
    tar --exclude=./.complete -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  fi
fi

# 2. The build context: the repository's files (tracked + untracked, not ignored), the local
#    wheels and the CA bundle; never .venv, .cta or run outputs.
context="$WORK/context"
log "staging the build context in $context"
rm -rf "$context"
mkdir -p "$context/.wheels"
# --ignore-failed-read: files deleted in the work tree but still tracked are skipped.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$context" -xf -
if [[ "$TORCH_BUILD" == cuda ]]; then
  # The CUDA build of the pinned release: PyPI's torch==X (Linux x86_64) is built with CUDA and
  # brings its nvidia-* runtime wheels. No local wheels: their X+cpu would win the resolve.
  pinned="$(sed -n 's/^torch==\([0-9.]*\)+cpu$/\1/p' "$context/requirements.txt")"
  [[ -n "$pinned" ]] || die "requirements.txt pins no torch==X+cpu to swap for its CUDA build"
  sed -i "s/^torch==$pinned+cpu$/torch==$pinned/" "$context/requirements.txt" "$context/constraints.txt"
  log "torch $pinned: the CUDA build from the package index"
else
  cp -l "$FIND_LINKS"/*.whl "$context/.wheels/" 2>/dev/null || cp "$FIND_LINKS"/*.whl "$context/.wheels/"
fi
cp "$CA_BUNDLE" "$context/.host-ca.crt"
commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"

# 3. The image.
log "building $IMAGE with $BUILDER"
args=(-f "$context/infra/images/Containerfile" -t "$IMAGE"
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "GIT_COMMIT=$commit"
      --build-arg "TORCH_BUILD=$TORCH_BUILD")
[[ -n "${PIP_INDEX_URL:-}" ]] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
if [[ "$BUILDER" == buildah ]]; then
  # chroot isolation: works inside containers and without user namespaces.
  buildah build --isolation chroot --layers --pull=never "${args[@]}" "$context"
else
  docker build "${args[@]}" "$context"
fi
log "built $IMAGE"
