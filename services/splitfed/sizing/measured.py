"""What sizing knows from measurement: units, the chart's request/limit convention, and the
peak-RSS parts each measured as VmHWM (/proc/PID/status) on this project's machines: the CPU
build in the role images (localhost/splitfed-torch:0.1.0: torch 2.13.0+cpu, Python 3.11.2) and the
CUDA build in the development virtualenv (torch 2.14.1+cu130, Python 3.11.7)."""

from __future__ import annotations

MIB = 1024 * 1024
FLOAT32, INT64 = 4, 8

# The chart's convention (values.yaml, ci/measure_memory.py --margin): request = peak and
# limit = 1.25 x peak, both rounded up to 32 Mi.
ROUND_TO_MIB = 32
LIMIT_MARGIN = 1.25

TORCH_BUILDS = ("cpu", "cuda")  # the images carry the CPU build; the -cuda images (gpu.enabled) the CUDA one
DEFAULT_TORCH_BUILD = "cpu"

# -- measured constants (MiB) --------------------------------------------------------------------

# Python with `splitfed.cli` imported (numpy, pika, cryptography, prometheus_client, typer, rich):
# 47-49 MiB with either build in the image, 55.6-56.1 MiB in the test virtualenv (its extras add
# optional parts of the same packages). Between the two, so that either lies within the bounds of
# a role that holds little else (the relay: 73 MiB peak on the host, 64 in its image, RUNTIME_MIB's).
INTERPRETER_MIB = 52.0
# `import torch` and the role modules, over INTERPRETER_MIB: 48 -> 233 MiB in the CPU image, 49 -> 524
# MiB with the CUDA build. A bare `python -c "import torch"` peaks at 222152 kB (CPU build) and
# 518684 kB (CUDA build) here: the same measurement, read in kB.
TORCH_IMPORT_MIB = {"cpu": 185.0, "cuda": 475.0}
# The first torch.optim optimiser imports torch._dynamo and with it sympy and mpmath (~900
# modules): 244 -> 317 MiB (CPU build), 534 -> 684 MiB (CUDA build). Only roles that train pay it:
# the fedavg-server's strategies are plain tensor arithmetic.
OPTIMIZER_IMPORT_MIB = {"cpu": 73.0, "cuda": 150.0}
# Kernels paged in by the first operations (normalising, linear, cross-entropy, convolution) and the
# model's construction: 233 -> 247 MiB (CPU), 524 -> 538 MiB (CUDA).
TORCH_KERNELS_MIB = 14.0
# scikit-learn, which loads the digits data set: 81 MiB over torch (CUDA virtualenv).
SKLEARN_IMPORT_MIB = 81.0
READER_IMPORT_MIB = {"digits": SKLEARN_IMPORT_MIB}  # by DatasetInfo.reader: what a built-in data set's reader imports of its own
# A running role over the one it has imported: broker connection and its threads, the metrics
# endpoint, logging. The relay, which holds nothing else: 49 -> 65.5 MiB on the host, 64 MiB in its image.
RUNTIME_MIB = 17.0

# Activations. Under autograd every layer's output stays until the backward pass, which then makes
# a gradient of each; glibc keeps freed blocks below its mmap threshold (32 MiB at most) in the heap,
# so a loop of steps peaks at about 3 x the sum of the outputs (cnn's first nine layers at batch 64:
# 20.7 MiB of outputs, 65-78 MiB measured). Without autograd (evaluation) each output is freed as
# the next is made, yet the heap's leftovers bring the peak to about the sum of the outputs (162 MiB
# for cnn at batch 500; 146-194 MiB measured over 20-100 batches). A role that does both peaks at
# the larger plus a quarter of the smaller (171-191 MiB measured for the split-client's layers).
TRAIN_ACTIVATION_FACTOR = 3.0
OTHER_PHASE_RESIDUE = 0.25
# The p2p-tracker's state: per peer its membership entry, sent in every list, and each report it
# keeps for the result (a few hundred bytes of Python objects each). With 4 peers over 2 epochs it
# peaked at 69-70 MiB (VmHWM, torch never imported): all but a few kB the interpreter and runtime.
TRACKER_PEER_BYTES = 4096
TRACKER_REPORT_BYTES = 2048
# A party's own data while it is read (learning.local_data), in bytes per input value of the parts
# the role reads, over the interpreter and torch: the peak (VmHWM) of reading the train part, then
# the test part, of 0.3M-12M values with Task.data in the CUDA virtualenv. Pixels (imagefolder PNGs
# and uint8 npz, 9.0-9.2): the uint8 values and np.bincount's int64 copy of a channel for the
# statistics. npz features (float32, 28.4): as stored, as float64, and the normalised float64
# temporaries before the float32 kept. csv (56-64): a Python float per cell, then float64 arrays.
# Reading the test part reads the train part again for its statistics while the train set is
# kept: per value of both parts that is 8.5-8.7 (pixels), 24 (npz features), 53 (csv), within the
# bounds of these. What a task's data() does on the way is its own: twice what it returns is
# assumed there (its tensors and the float32 copy or stack of them), not measured.
OWN_DATA_READ_BYTES = {"imagefolder": 9.0, "npz pixels": 9.0, "npz features": 28.5, "csv": 56.0}
TASK_DATA_READ_COPIES = 2.0
# A message between the split halves is held about four times over: received, as the frames pika
# gathers and their join, then the decoded arrays; sent, as the encoded body and pika's frames. (At
# cut 3, 12 MiB messages: the relay peaked 52 MiB above its idle 65 MiB.)
MESSAGE_COPIES = 4
# State a torch.optim optimiser keeps per parameter (learning.train.optimizer): Adam its two
# moments; `sgd` there is SGD with momentum 0.9, one buffer (plain SGD would keep none).
OPTIMIZER_STATE = {"adam": 2, "sgd": 1}

# GPU (with --gpu). The CUDA context holds device memory of its own before any tensor: about 300-800
# MiB depending on the GPU, driver and CUDA version (pytorch/pytorch#34323 shows 781 MB in nvidia-smi
# for a trivial program; with lazy module loading, CUDA >= 11.7, 128-256 MiB have been reported). Not
# measured here: no GPU was available. On the device PyTorch's caching allocator reuses freed
# blocks, so activations peak at about the outputs kept for backward plus their gradients, or the
# largest input and output pair in evaluation, rounded up to its blocks.
CUDA_CONTEXT_MIB = (300.0, 500.0, 800.0)  # low, estimate, high
GPU_ALLOCATOR_ROUNDING = 1.1

# Relative uncertainty of each kind of part: (low factor, high factor).
UNCERTAINTY = {
    "baseline": (0.95, 1.05), "overhead": (0.8, 1.2), "data": (0.95, 1.05), "model": (1.0, 1.5),
    "activations": (0.75, 1.35), "messages": (0.5, 2.0),
}
