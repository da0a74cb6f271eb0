#!/usr/bin/env bash
# Build splitfed's CPU images with podman, no registry needed: a Debian base made with
# debootstrap (kept once made), then every target of images/Containerfile, tagged
# localhost/splitfed-TARGET:VERSION and :latest. Prints build times and a table of sizes.
#
# Environment:
#   DEBIAN_MIRROR  mirror debootstrap fetches from     (default http://deb.debian.org/debian)
#   TORCH_WHEELS   folder with a torch CPU wheel; when it holds one, torch comes from there,
#                  else from PyTorch's CPU index                          (default /opt/wheels)
#   CA_BUNDLE      host CA bundle mounted (read-only, never copied) over the build
#                  containers' own, for TLS-intercepting proxies
#                  (default /etc/ssl/certs/ca-certificates.crt where it exists)
# Usage: ci/images.sh [--task DIR]
#   --task DIR  then also build each torch role's image with the Python package in DIR installed
#               (images/task.Containerfile), tagged localhost/splitfed-TARGET:VERSION-NAME, NAME
#               being DIR's name: the chart's image.tag for a task given as task.module
set -euo pipefail
task_dir=
case "${1:-}" in
  --task) [ -d "${2:-}" ] || { echo "images: --task needs the package's folder, not '${2:-}'" >&2; exit 2; }
          task_dir=$(cd "$2" && pwd) ;;
  "") ;;
  *) echo "usage: ci/images.sh [--task DIR]" >&2; exit 2 ;;
esac
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
  trap '$sudo rm -rf "$root"' RETURN
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
build_args=(--format docker --network host --build-arg "BASE=$BASE" -f images/Containerfile "${ca_mount[@]}")
wheel=$(find "$TORCH_WHEELS" -maxdepth 1 -name 'torch-*+cpu-*.whl' 2>/dev/null | sort | tail -n 1)
if [ -n "$wheel" ]; then
  torch_version=$(basename "$wheel" | cut -d- -f2)
  echo "images: torch ${torch_version} from $wheel"
  build_args+=(--volume "$TORCH_WHEELS:/mnt:ro" --build-arg TORCH_SOURCE=wheels
               --build-arg "TORCH_VERSION=${torch_version%+cpu}")
else
  echo "images: torch from PyTorch's CPU index (no CPU wheel in $TORCH_WHEELS)"
  build_args+=(--build-arg TORCH_SOURCE=index)
fi
build_args+=(--build-arg TORCH_VARIANT=cpu)

times=()
total_started=$SECONDS
for target in "${CPU_TARGETS[@]}"; do
  image=localhost/splitfed-$target
  started=$SECONDS
  "${podman[@]}" build "${build_args[@]}" --target "$target" -t "$image:$VERSION" -t "$image:latest" . \
    > >(sed "s/^/[$target] /") 2>&1
  times+=("$((SECONDS - started))")
done
echo "images: built ${#CPU_TARGETS[@]} images in $((SECONDS - total_started)) s"

if [ -n "$task_dir" ]; then
  task_name=$(basename "$task_dir" | tr 'A-Z_' 'a-z-')
  after_torch=false  # the targets after torch in CPU_TARGETS are the torch roles', which run a task
  for target in "${CPU_TARGETS[@]}"; do
    if $after_torch; then
      "${podman[@]}" build --format docker --network host -f images/task.Containerfile --build-arg "BASE=$BASE" "${ca_mount[@]}" \
        --build-arg "ROLE_IMAGE=localhost/splitfed-$target:$VERSION" -t "localhost/splitfed-$target:$VERSION-$task_name" "$task_dir" \
        > >(sed "s/^/[$target task] /") 2>&1
    fi
    if [ "$target" = torch ]; then after_torch=true; fi
  done
  echo "images: the torch roles' images with $task_dir installed are tagged :$VERSION-$task_name: give the chart that image.tag for each role, and task.module"
fi

printf '\n%-40s %10s %8s\n' IMAGE SIZE_MB BUILD_S
for i in "${!CPU_TARGETS[@]}"; do
  image=localhost/splitfed-${CPU_TARGETS[$i]}:$VERSION
  bytes=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
  printf '%-40s %10d %8d\n' "$image" "$((bytes / 1000000))" "${times[$i]}"
done
