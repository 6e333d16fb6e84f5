#!/usr/bin/env bash
# make setup-system: the system tools the tests and the image build use, from Debian's
# packages: chromium (report screenshots via Playwright), buildah + podman + runc (image),
# debootstrap (the image's base), and kubectl (renders the kustomize manifests).
# Idempotent: installs only what is missing; uses sudo only when not root.
set -euo pipefail

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup-system: not root and no sudo" >&2; exit 2; }
  SUDO="sudo"
fi

# command -> Debian package
declare -A PACKAGES=(
  [chromium]=chromium
  [buildah]=buildah
  [podman]=podman
  [runc]=runc
  [debootstrap]=debootstrap
)
missing=()
for tool in "${!PACKAGES[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("${PACKAGES[$tool]}")
done

# kubectl: Debian's own kubernetes-client (1.20) embeds a kustomize too old for our manifests;
# take the `kubectl` package where an apt source offers it (e.g. pkgs.k8s.io), else say how.
need_kubectl=false
command -v kubectl >/dev/null 2>&1 || need_kubectl=true

if (( ${#missing[@]} )) || $need_kubectl; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
fi
if (( ${#missing[@]} )); then
  echo "setup-system: installing ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup-system: chromium, buildah, podman, runc, debootstrap present"
fi

if $need_kubectl; then
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    echo "setup-system: installing kubectl"
    $SUDO apt-get install -y -qq kubectl
  else
    cat >&2 <<'MSG'
setup-system: kubectl is missing and no apt source offers it. Install kubectl >= 1.27
(kustomize v5), e.g. from the Kubernetes apt repository (pkgs.k8s.io, see
https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/), or any kubectl binary on PATH.
Debian's kubernetes-client package (1.20) is too old for infra/k8s/platform.
MSG
    exit 1
  fi
fi
kubectl version --client 2>/dev/null | head -2
