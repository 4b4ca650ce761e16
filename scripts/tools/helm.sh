#!/usr/bin/env bash
# Install helm at a pinned version (built from its Go module, cached) and print its path.
#
#   bash scripts/tools/helm.sh          # prints ~/.cache/e2ee-relay/tools/helm-v3.22.0/helm
#
# The binary lives in a directory named after the version, so a second run (or another
# clone) reuses it and a change of HELM_VERSION builds the new one beside it. It is built
# with `go install` from the Go module proxy: helm's release downloads are not reachable.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_K8S_MINOR="${HELM_K8S_MINOR:-37}"
TOOLS="${RELAY_TOOLS_DIR:-$HOME/.cache/e2ee-relay/tools}"
dir="$TOOLS/helm-$HELM_VERSION"
helm="$dir/helm"

if [[ ! -x "$helm" ]]; then
    if ! command -v go >/dev/null; then
        echo "scripts/tools/helm.sh: helm $HELM_VERSION is built with Go, and go is not on PATH" >&2
        exit 1
    fi
    echo "building helm $HELM_VERSION into $dir (once; cached)" >&2
    mkdir -p "$dir.tmp"
    # Stamped the way helm's own Makefile does: its version, and the Kubernetes version
    # `helm template` and `helm lint` assume (that of its client-go: 1.37 for v3.22).
    k8s="-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
    k8s+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR"
    k8s+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
    k8s+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR"
    GOBIN="$dir.tmp" CGO_ENABLED=0 go install \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $k8s" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
fi
echo "$helm"
