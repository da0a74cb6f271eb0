#!/usr/bin/env bash
# The GPU check (issue 27), for a machine that has Python, torch and a GPU and nothing else, no
# network either: installs from .gpu-carry/ (ci/gpu_wheels.sh fills it) what that machine lacks,
# then runs every scenario over the in-memory transport on cuda in fp32 and bf16 against the same
# runs on the CPU, and the throughput table (ci/bench_device.py scenarios, then throughput).
# Usage: ci/gpu_check.sh [--cpu-only]
#   --cpu-only  the same flow on the CPU alone, as when torch sees no GPU
# PYTHON: the Python that holds torch (default python3). OUT: where the tables (markdown), their
# figures (JSON) and the log go (default results/gpu-check).
# Exit code 1 when a run fails, a device's accuracy is further from the CPU's than the stated
# tolerance, or bf16 on the wire does not halve split learning's bytes per batch; what was
# measured is printed and written either way.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

cpu_only=false
case ${1:-} in
  --cpu-only) cpu_only=true ;;
  "") ;;
  *) echo "gpu_check: unknown argument $1 (usage: ci/gpu_check.sh [--cpu-only])" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
out=${OUT:-results/gpu-check}
carry=.gpu-carry
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1

if [ -d "$carry/wheels" ]; then
  # Only what is missing or too old is installed: the machine's own torch, numpy and the rest stay.
  mapfile -t requirements < <("$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  "$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$carry/wheels" "${requirements[@]}" \
    || { echo "gpu_check: the wheels in $carry do not install here (see above)"; exit 2; }
  # torchvision pins the torch it was built for: it goes in without its dependencies (Pillow is
  # one), and the import below says whether it matches the torch here.
  if ! "$python" -c "import torchvision" 2>/dev/null; then
    "$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$carry/wheels" pillow \
      && "$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$carry/wheels" --no-deps --upgrade torchvision
  fi
fi
export PYTHONPATH=$PWD/services${PYTHONPATH:+:$PYTHONPATH}
data=()
[ -d "$carry/fashion-mnist" ] && data=(--data-dir "$carry/fashion-mnist")

"$python" - <<'EOF' || exit 2
import platform, torch
try:
    import torchvision
    vision = f"torchvision {torchvision.__version__}"
except Exception as exc:  # missing, or built for another torch: the resnet18 rows will fail
    vision = f"no working torchvision, so the resnet18 rows will fail ({type(exc).__name__}: {exc})"
gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "no GPU: the CPU only"
print(f"gpu_check: Python {platform.python_version()}, torch {torch.__version__}, {vision}; {gpu}")
EOF
"$python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || cpu_only=true
devices=()
$cpu_only && devices=(--devices cpu)

# With a GPU the whole check must end inside 8 minutes: each step starts no run after its second
# of the check, and the scenarios' runs still going then are stopped (the throughput step ends
# the run in hand); the runs left count as failures. The CPU alone takes what it takes.
started=$SECONDS
step() {  # NAME, the second of the check after which it starts no run
  local limit=()
  $cpu_only || limit=(--seconds $(($2 - (SECONDS - started))))
  "$python" ci/bench_device.py "$1" "${devices[@]}" "${data[@]}" --out-dir "$out" "${limit[@]}"
}
step scenarios 260
scenarios=$?
step throughput 420
throughput=$?

for name in scenarios throughput; do
  ((${!name} == 0)) || echo "gpu_check: $name: FAILED (exit code ${!name})"
done
echo "gpu_check: $((SECONDS - started)) s; tables and figures in $out"
((scenarios == 0 && throughput == 0))
