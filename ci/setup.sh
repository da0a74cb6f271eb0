#!/usr/bin/env bash
# Install everything splitfed needs on a fresh Debian machine: system packages (the Fashion-MNIST
# data set; RabbitMQ and Prometheus with promtool for the tests), a virtual environment with torch and the package.
# Usage: ci/setup.sh [run|test]
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-run}
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
if [ "$purpose" = test ]; then
  command -v rabbitmq-server >/dev/null || packages+=(rabbitmq-server)
  command -v promtool >/dev/null || packages+=(prometheus)
fi
if ((${#packages[@]})); then
  echo "setup: installing ${packages[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${packages[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch: the build these machines keep on disk (pip takes it from there; a CUDA build that runs on CPU
# too), the one the -cuda images carry.
# shellcheck source=ci/torch.env
. ci/torch.env
.venv/bin/pip install -q --disable-pip-version-check "torch==$CUDA_TORCH_VERSION" "torchvision==$(torchvision_for "$CUDA_TORCH_VERSION")"
extras=learning,plots,cluster
[ "$purpose" = test ] && extras=learning,plots,cluster,test
.venv/bin/pip install -q --disable-pip-version-check -e ".[$extras]"
echo "setup: ready (.venv/bin/splitfed)"
