#!/usr/bin/env bash
# End to end on a real Kubernetes, for machines that have kind: a kind cluster from k8s/kind.yaml
# (a CPU worker and a worker labelled and tainted like a GPU node), the images ci/images.sh builds
# loaded into it, then `splitfed launch` a small FedAvg run (workers on the GPU-like node), a
# small split run through the relay and a small run of three split clients (splitfed-v2, with the
# split-fed), `helm test` on each, `splitfed status` and logs collected,
# the results checked, a launch that asks for more GPUs than there are (it must fail with
# "Pending for lack of GPUs"), and everything torn down.
#
# It has not been run where splitfed is developed: no kind, Docker or API server can run there.
#
# Needs: kind, kubectl, podman (ci/images.sh builds with it; kind may use docker or podman), helm 3
# (on PATH, or .tools/bin/helm from ci/chart.sh install) and the venv from ci/setup.sh test.
# Usage: ci/kind-e2e.sh [RESULTS_DIR]     (default results/kind-e2e)
# Environment: KIND_CLUSTER (default splitfed-e2e), KEEP_CLUSTER=1 keeps the cluster afterwards,
#              SKIP_IMAGES=1 skips ci/images.sh (images already built).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-splitfed-e2e}
context=kind-$cluster
namespace="splitfed-e2e"
results=${1:-results/kind-e2e}
splitfed=.venv/bin/splitfed
helm=$(command -v helm || echo .tools/bin/helm)
roles=(relay split-client split-server split-fed fedavg-server fedavg-worker)
broker_image=docker.io/library/rabbitmq:4.1

for tool in kind kubectl podman "$helm" "$splitfed"; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is needed" >&2; exit 2; }
done
version=$(.venv/bin/python -c 'import splitfed; print(splitfed.__version__)')
mkdir -p "$results"
work=$(mktemp -d)

collect() {
  kubectl --context "$context" get pods -A -o wide >"$results/pods.txt" 2>&1 || true
  kubectl --context "$context" get events -n "$namespace" --sort-by=.lastTimestamp >"$results/events.txt" 2>&1 || true
  "$splitfed" status -A --kube-context "$context" >"$results/status.txt" 2>&1 || true
}

teardown() {
  local code=$?
  collect
  rm -rf "$work"
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "kind-e2e: cluster $cluster kept (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" || true
  fi
  if ((code)); then echo "kind-e2e: FAILED ($code); see $results" >&2; fi
  exit "$code"
}
trap teardown EXIT

kind create cluster --name "$cluster" --config k8s/kind.yaml --wait 180s

# Images: the CPU images as ci/images.sh tags them, loaded into every node. The GPU-like node has
# no GPU: the fedavg-worker's CPU image goes there under the -cuda tag a GPU role asks for.
[ "${SKIP_IMAGES:-0}" = 1 ] || ci/images.sh
load() {
  local archive
  archive="$work/$(echo "$1" | tr '/:' '__').tar"
  podman save -o "$archive" "$1"
  kind load image-archive "$archive" --name "$cluster"
}
for role in "${roles[@]}"; do
  load "localhost/splitfed-$role:$version"
done
podman tag "localhost/splitfed-fedavg-worker:$version" "localhost/splitfed-fedavg-worker:$version-cuda"
load "localhost/splitfed-fedavg-worker:$version-cuda"
podman pull -q "$broker_image" >/dev/null
load "$broker_image"

# One fake GPU per pod on the GPU-like node: an extended resource advertised by hand.
gpu_node=$(kubectl --context "$context" get nodes -l nvidia.com/gpu.present=true -o jsonpath='{.items[0].metadata.name}')
kubectl --context "$context" patch node "$gpu_node" --subresource=status --type=json \
  -p '[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "2"}]'
kubectl --context "$context" create namespace "$namespace"
cluster_args=(--kube-context "$context" --namespace "$namespace")
# The chart's defaults do not fit this cluster, so every launch scales them down:
# - fedavgServer.replicas=1: two server pods (active + standby) share a ReadWriteMany checkpoint
#   claim, and kind's default storage class (local-path) offers ReadWriteOnce only, so the claim
#   would stay Pending and the servers with it. One server with a ReadWriteOnce claim still
#   resumes from its checkpoint after a restart; failover is left to tests/integration.
# - broker.rabbitmq.replicas=1: three RabbitMQ nodes for each of the three releases below would
#   all land on the one untainted worker (the control plane and the GPU-like worker are tainted):
#   nine nodes, 4.5Gi of memory requested, more than a small kind host spares, and no spread over
#   hosts to show for it. With one node the chart uses classic queues.
small=(--set fedavgServer.replicas=1 --set broker.rabbitmq.replicas=1)

# A small FedAvg run: two workers on the GPU-like node (selector, toleration, GPU limit); the node
# has no real GPU, so they compute on its CPU (settings.device=cpu overrides gpu.enabled's cuda).
"$splitfed" launch fedavg "${cluster_args[@]}" "${small[@]}" --name fl --dataset digits --workers 2 --partition iid --rounds 2 \
  --set fedavgWorker.gpu.enabled=true --set fedavgWorker.settings.device=cpu --wait-timeout 900 --out "$results/fedavg.json"
worker_nodes=$(kubectl --context "$context" -n "$namespace" get pods \
  -l app.kubernetes.io/instance=fl,app.kubernetes.io/component=fedavg-worker -o jsonpath='{.items[*].spec.nodeName}')
for node in $worker_nodes; do
  [ "$node" = "$gpu_node" ] || { echo "kind-e2e: a GPU worker ran on $node, not on $gpu_node" >&2; exit 1; }
done
"$helm" test fl --kube-context "$context" --namespace "$namespace" >"$results/fedavg-helm-test.txt"
"$splitfed" status "${cluster_args[@]}" --name fl >"$results/fedavg-status.txt"
"$splitfed" logs fl "${cluster_args[@]}" --tail 0 >"$results/fedavg-server.log"

# A small split run through the relay.
"$splitfed" launch split "${cluster_args[@]}" "${small[@]}" --name sp --dataset digits --epochs 1 --batch-size 32 \
  --wait-timeout 900 --out "$results/split.json"
"$helm" test sp --kube-context "$context" --namespace "$namespace" >"$results/split-helm-test.txt"
"$splitfed" status "${cluster_args[@]}" --name sp >"$results/split-status.txt"
"$splitfed" logs sp "${cluster_args[@]}" --tail 0 >"$results/split-client.log"

# Three split clients (an Indexed Job) on splitfed-v2 with the split-fed; the server leads.
"$splitfed" launch splitnn "${cluster_args[@]}" "${small[@]}" --name nn --dataset digits --clients 3 --schedule splitfed-v2 \
  --epochs 1 --batch-size 32 --wait-timeout 900 --out "$results/splitnn.json"
"$helm" test nn --kube-context "$context" --namespace "$namespace" >"$results/splitnn-helm-test.txt"
"$splitfed" status "${cluster_args[@]}" --name nn >"$results/splitnn-status.txt"
"$splitfed" logs nn "${cluster_args[@]}" --tail 0 >"$results/splitnn-server.log"

# More GPUs than any node has: launch must stop with the reason.
if "$splitfed" launch fedavg "${cluster_args[@]}" "${small[@]}" --name nogpu --dataset digits --workers 1 --partition iid --rounds 1 \
  --set fedavgServer.gpu.enabled=true --set fedavgServer.gpu.count=4 --pending-timeout 30 --wait-timeout 300 \
  2>"$results/no-gpu.err"; then
  echo "kind-e2e: a launch asking for 4 GPUs succeeded" >&2
  exit 1
fi
grep -q "Pending for lack of GPUs" "$results/no-gpu.err" || { cat "$results/no-gpu.err" >&2; exit 1; }

.venv/bin/python - "$results" <<'PY'
import json
import pathlib
import sys

results = pathlib.Path(sys.argv[1])
for scenario, floor in (("fedavg", 0.3), ("split", 0.5), ("splitnn", 0.3)):  # two rounds, one epoch on digits: above chance (0.1)
    result = json.loads((results / f"{scenario}.json").read_text())
    assert result["scenario"] == scenario and result["config"]["launch"] == "kubernetes", result["config"]
    assert result["accuracy"] > floor, f"{scenario}: accuracy {result['accuracy']}"
    print(f"kind-e2e: {scenario} accuracy {result['accuracy']:.4f} after {len(result['history'])} steps")
PY

collect
for release in fl sp nn nogpu; do
  "$splitfed" delete "$release" "${cluster_args[@]}" --volumes
done
echo "kind-e2e: passed; results in $results"
