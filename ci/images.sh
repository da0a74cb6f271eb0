#!/usr/bin/env bash
# Build splitfed's images with podman, no registry needed: a Debian base made with debootstrap
# (kept once made), then every target of images/Containerfile with the CPU build of torch, tagged
# localhost/splitfed-TARGET:VERSION and :latest. Prints build times and a table of sizes.
#
# Environment:
#   DEBIAN_MIRROR  mirror debootstrap fetches from     (default http://deb.debian.org/debian)
#   TORCH_WHEELS   folder with a torch CPU wheel; when it holds one, torch comes from there,
#                  else from PyTorch's CPU index; torchvision (the release built for that torch)
#                  and the rest from the package index                   (default /opt/wheels)
#   CA_BUNDLE      host CA bundle mounted (read-only, never copied) over the build
#                  containers' own, for TLS-intercepting proxies
#                  (default /etc/ssl/certs/ca-certificates.crt where it exists)
# Usage: ci/images.sh [--cuda] [--task DIR]
#   --cuda      then also build the torch roles' CUDA images, tagged localhost/splitfed-TARGET:VERSION-cuda
#               and :latest-cuda (the tags the chart's gpu.enabled takes: gpu.imageTagSuffix): torch
#               CUDA_TORCH_VERSION of ci/torch.env (PyPI's build, with its CUDA libraries) and its
#               torchvision, whose wheels and dependencies this machine's pip gathers into
#               build/wheels-cuda (pip download, from wherever its configuration finds them: here the
#               wheels on disk) for the build to install from. About 3 GB of wheels and 5 GB an image:
#               not part of `make test`
#   --task DIR  then also build each torch role's image with the Python package in DIR installed
#               (images/task.Containerfile), tagged localhost/splitfed-TARGET:VERSION-NAME, NAME
#               being DIR's name: the chart's image.tag for a task given as task.module (with
#               --cuda, the CUDA ones too, tagged VERSION-NAME-cuda)
set -euo pipefail
task_dir=
cuda=false
usage="usage: ci/images.sh [--cuda] [--task DIR]"
while (($#)); do
  case "$1" in
    --task) [ -d "${2:-}" ] || { echo "images: --task needs the package's folder, not '${2:-}'" >&2; exit 2; }
            task_dir=$(cd "$2" && pwd); shift 2 ;;
    --cuda) cuda=true; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=$PWD/ci/containers.conf
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

BASE=localhost/splitfed-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
# core, the torch-free roles' images, torch, the torch roles' images: each role's `image` as declared
# (RoleSpec: torch or not), which tests/unit/test_declarations.py checks this list against.
CPU_TARGETS=(core relay split-fed p2p-tracker torch split-client split-server fedavg-server fedavg-worker p2p-peer smpl-peer)

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "images: installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
podman=($sudo podman)

make_base() {
  local root
  root=$(mktemp -d)
  trap '$sudo rm -rf "$root"; trap - RETURN' RETURN  # once: a RETURN trap outlives the function (sourcing a file fires it again)
  $sudo debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
  # What no service reads: package lists and caches, documentation (licences stay), man
  # pages, translations. dpkg keeps leaving them out should anything be installed later.
  $sudo rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/usr/share/lintian
  $sudo find "$root"/usr/share/doc -type f ! -name copyright -delete
  $sudo find "$root"/usr/share/doc -type d -empty -delete
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    | $sudo tee "$root"/etc/dpkg/dpkg.cfg.d/splitfed-slim >/dev/null
  $sudo tar -C "$root" -c . | "${podman[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
}

if "${podman[@]}" image exists "$BASE"; then
  echo "images: reusing $BASE"
else
  echo "images: making $BASE with debootstrap from $DEBIAN_MIRROR"
  started=$SECONDS
  make_base
  echo "images: $BASE made in $((SECONDS - started)) s"
fi

ca_mount=()
[ -f "$CA_BUNDLE" ] && ca_mount=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
# shellcheck source=ci/torch.env
. ci/torch.env
cpu_args=(--build-arg TORCH_VARIANT=cpu)
wheel=$(find "$TORCH_WHEELS" -maxdepth 1 -name 'torch-*+cpu-*.whl' 2>/dev/null | sort | tail -n 1)
if [ -n "$wheel" ]; then
  torch_version=$(basename "$wheel" | cut -d- -f2)
  echo "images: torch ${torch_version} from $wheel"
  cpu_args+=(--volume "$TORCH_WHEELS:/mnt:ro" --build-arg TORCH_SOURCE=wheels
             --build-arg "TORCH_VERSION=${torch_version%+cpu}" --build-arg "TORCHVISION_VERSION=$(torchvision_for "$torch_version")")
else
  echo "images: torch from PyTorch's CPU index (no CPU wheel in $TORCH_WHEELS)"
  cpu_args+=(--build-arg TORCH_SOURCE=index)
fi

# The torch stage and the torch roles' targets: those from torch on in CPU_TARGETS.
for i in "${!CPU_TARGETS[@]}"; do
  if [ "${CPU_TARGETS[$i]}" = torch ]; then TORCH_TARGETS=("${CPU_TARGETS[@]:i}"); fi
done
built=()  # image:tag
times=()  # seconds, by image

# build SUFFIX TARGET...: each target of images/Containerfile, with the build arguments after
# the common ones in "${variant_args[@]}", tagged :VERSION$SUFFIX and :latest$SUFFIX.
build() {
  local suffix=$1 target image started
  shift
  for target in "$@"; do
    image=localhost/splitfed-$target
    started=$SECONDS
    "${podman[@]}" build --format docker --network host --build-arg "BASE=$BASE" -f images/Containerfile "${ca_mount[@]}" \
      "${variant_args[@]}" --target "$target" -t "$image:$VERSION$suffix" -t "$image:latest$suffix" . \
      > >(sed "s/^/[$target$suffix] /") 2>&1
    built+=("$image:$VERSION$suffix")
    times+=("$((SECONDS - started))")
  done
}

total_started=$SECONDS
variant_args=("${cpu_args[@]}")
build "" "${CPU_TARGETS[@]}"
echo "images: built ${#CPU_TARGETS[@]} images in $((SECONDS - total_started)) s"

flavours=("")
if $cuda; then
  cuda_wheels=build/wheels-cuda
  torchvision_version=$(torchvision_for "$CUDA_TORCH_VERSION")
  echo "images: gathering torch $CUDA_TORCH_VERSION, torchvision $torchvision_version and their dependencies into $cuda_wheels"
  mkdir -p "$cuda_wheels"
  # For the base's Python (the virtual environment's), whichever this machine's is.
  base_python=$("${podman[@]}" run --rm --network none "$BASE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$base_python" --dest "$cuda_wheels" \
    "torch==$CUDA_TORCH_VERSION" "torchvision==$torchvision_version"
  started=$SECONDS
  variant_args=(--build-arg TORCH_VARIANT=cuda --build-arg TORCH_SOURCE=wheels --volume "$PWD/$cuda_wheels:/mnt:ro"
                --build-arg "TORCH_VERSION=$CUDA_TORCH_VERSION" --build-arg "TORCHVISION_VERSION=$torchvision_version")
  build -cuda "${TORCH_TARGETS[@]}"
  echo "images: built ${#TORCH_TARGETS[@]} CUDA images in $((SECONDS - started)) s"
  flavours+=(-cuda)
  # What they must hold (the torch CUDA build, torchvision whole, each role's entrypoint): checked
  # here, since `make test` builds no CUDA image and so its suite does not collect these checks.
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/images/check_cuda_images.py
fi

if [ -n "$task_dir" ]; then
  task_name=$(basename "$task_dir" | tr 'A-Z_' 'a-z-')
  for suffix in "${flavours[@]}"; do
    for target in "${TORCH_TARGETS[@]:1}"; do  # the torch roles', which run a task
      "${podman[@]}" build --format docker --network host -f images/task.Containerfile --build-arg "BASE=$BASE" "${ca_mount[@]}" \
        --build-arg "ROLE_IMAGE=localhost/splitfed-$target:$VERSION$suffix" -t "localhost/splitfed-$target:$VERSION-$task_name$suffix" "$task_dir" \
        > >(sed "s/^/[$target$suffix task] /") 2>&1
    done
  done
  echo "images: the torch roles' images with $task_dir installed are tagged :$VERSION-$task_name$($cuda && echo " (and :$VERSION-$task_name-cuda)"):" \
       "give the chart that image.tag for each role, and task.module"
fi

printf '\n%-46s %10s %8s\n' IMAGE SIZE_MB BUILD_S
for i in "${!built[@]}"; do
  bytes=$("${podman[@]}" image inspect --format '{{.Size}}' "${built[$i]}")
  printf '%-46s %10d %8d\n' "${built[$i]}" "$((bytes / 1000000))" "${times[$i]}"
done
