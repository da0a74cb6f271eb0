#!/usr/bin/env bash
# Fill .gpu-carry/ with what ci/gpu_check.sh needs on a bare machine that has only Python, torch
# and a GPU, and no network: wheels of splitfed's run-time dependencies (pyproject's
# `dependencies` and what they need), torchvision for the torch these machines install and Pillow
# for it, and Fashion-MNIST (the whole test set, the first --train-samples training samples: the
# full training set would not fit beside the wheels).
# The folder travels with the working tree, which must stay within 64 MiB in all.
# Usage: ci/gpu_wheels.sh [--python 3.12] [--torchvision 0.29.1] [--train-samples 20000] [--data-dir DIR]
#   --python         the Python of the GPU machine (the ones this was written for have 3.12)
#   --torchvision    the release matching the torch there (0.29.1 is torch 2.14.1's, the one ci/setup.sh installs)
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=3.12
torchvision=0.29.1
train_samples=20000
data_dir=/usr/share/datasets/fashion-mnist  # learning.data's FASHION_MNIST_SYSTEM_DIR
while (($#)); do
  case $1 in
    --python) python_version=$2; shift 2 ;;
    --torchvision) torchvision=$2; shift 2 ;;
    --train-samples) train_samples=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    *) echo "gpu_wheels: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done

carry=.gpu-carry
budget=$((64 * 1024 * 1024))
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
rm -rf "$carry"
mkdir -p "$carry/wheels" "$carry/fashion-mnist"

# pip matches each manylinux tag exactly: these cover the wheels of every dependency.
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
download=("$python" -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp
          --python-version "$python_version" "${platforms[@]}" -d "$carry/wheels")

mapfile -t requirements < <("$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
echo "gpu_wheels: Python $python_version: ${requirements[*]} pillow, torchvision==$torchvision"
"${download[@]}" "${requirements[@]}" pillow
# --no-deps: torchvision pins the torch it was built for, which the GPU machine brings.
"${download[@]}" --no-deps "torchvision==$torchvision"

# IDX files keep their format: a header with the count, then the samples; the first N are kept.
"$python" - "$data_dir" "$carry/fashion-mnist" "$train_samples" <<'EOF'
import gzip, math, shutil, struct, sys
from pathlib import Path

source, target, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def opened(stem):
    for path in (source / stem, source / f"{stem}.gz"):
        if path.is_file():
            return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    sys.exit(f"gpu_wheels: {source} has no {stem}(.gz): give the Fashion-MNIST IDX folder with --data-dir")

for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    with opened(stem) as src, gzip.open(target / f"{stem}.gz", "wb", compresslevel=9) as dst:
        shutil.copyfileobj(src, dst)
for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
    with opened(stem) as src:
        raw = src.read()
    dims = raw[3]
    count, *sample = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    count = min(count, keep)
    body = 4 + 4 * dims
    with gzip.open(target / f"{stem}.gz", "wb", compresslevel=9) as dst:
        dst.write(raw[:4] + struct.pack(f">{dims}I", count, *sample) + raw[body : body + count * math.prod(sample)])
print(f"gpu_wheels: Fashion-MNIST: {count} training and 10000 test samples in {target}")
EOF

carried=$(du -sb "$carry" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
find "$carry" -type f -printf '%s %P\n' | sort -k2 | awk '{printf "  %8.2f MiB  %s\n", $1 / 1048576, $2}'
awk -v c="$carried" -v t="$tree" -v b="$budget" 'BEGIN {
  printf "gpu_wheels: %s: %.1f MiB; the working tree beside it: %.1f MiB; together %.1f of %.0f MiB\n", ".gpu-carry", c / 1048576, t / 1048576, (c + t) / 1048576, b / 1048576
}'
if ((carried + tree > budget)); then
  echo "gpu_wheels: over the 64 MiB a lent machine takes: lower --train-samples" >&2
  exit 1
fi
