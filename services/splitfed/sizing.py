"""How much memory a role needs, estimated from its settings before anything runs (`splitfed size`,
and `splitfed launch`'s check of the chart's limits).

Pure arithmetic and torch-free, so that a machine that only drives the cluster can use it. The
models' layers are described here a second time, as shapes (`model_layers`); tests/unit/test_sizing.py
checks them against `learning.models` layer by layer, so the two cannot drift apart.

A role's peak RSS is the larger of two phases, each a sum of parts:
- loading its data: the interpreter and torch, plus the data set while it is read and converted;
- running: the interpreter and torch, the data it keeps, its layers' parameters, gradients and
  optimiser state, the activations of its layers at the batch size (training) and at the
  evaluation batch size, the messages it holds as bytes, and framework overhead.

Every constant below was measured as VmHWM (/proc/PID/status), on this project's machines: the CPU
build in the role images (localhost/splitfed-torch:0.1.0: torch 2.13.0+cpu, Python 3.11.2) and
the CUDA build in the development virtualenv (torch 2.14.1+cu130, Python 3.11.7). The estimate's
low and high bounds come from each part's own uncertainty; tests/integration/test_sizing.py runs
the real roles and checks that their peaks lie within them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from splitfed import config
from splitfed.learning.settings import (
    DATASETS, MODELS, SPLIT_MODES, DatasetInfo, FederatedSettings, P2PSettings, PeerSettings, SMPLSettings, SplitNNSettings, SplitSettings,
    parse_partition,
)

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
# 47-49 MiB with either build, in the image and in the virtualenv.
INTERPRETER_MIB = 48.0
# `import torch` and the role modules, over INTERPRETER_MIB: 48 -> 233 MiB in the CPU image, 49 -> 524
# MiB with the CUDA build. The figures, a bare `python -c "import torch"` (222 MB for the CPU
# build, 511 MB for the CUDA one), are the same measurement read in kB: 222152 kB and 518684 kB here.
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

# Sample counts of each data set's files (learning.data reads all of a file even with --limit).
TRAIN_SAMPLES = {"fashion-mnist": 60000, "mnist": 60000, "digits": 1437, "cifar10": 50000}  # digits: 80% of sklearn's 1797
TEST_SAMPLES = {"fashion-mnist": 10000, "mnist": 10000, "digits": 360, "cifar10": 10000}
assert set(TRAIN_SAMPLES) == set(TEST_SAMPLES) == set(DATASETS), "sizing must know every data set's sample counts"

# learning.models.DEFAULT_CUT (that module imports torch); tests/unit/test_sizing.py checks they agree.
DEFAULT_CUT = 9
TAIL_LAYERS = 1  # learning.cutting.cut's default: the client's tail in u-shaped mode

ROLE_NAMES = ("relay", "split-client", "split-server", "split-fed", "fedavg-server", "fedavg-worker", "p2p-tracker", "p2p-peer", "smpl-peer")
SPLIT_ROLES = ("relay", "split-client", "split-server", "split-fed")
PEER_ROLES = ("p2p-peer", "smpl-peer")
GPU_ROLES = ("split-client", "split-server", "fedavg-server", "fedavg-worker", *PEER_ROLES)  # the chart's roles with a gpu section


# -- the models, as shapes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer of an `nn.Sequential` model, as sizes: its parameters and its output per sample."""

    kind: str  # conv | relu | pool | flatten | linear
    params: int
    out: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.out)

    @property
    def view(self) -> bool:
        """Its output shares its input's memory."""
        return self.kind == "flatten"

    @property
    def indices(self) -> bool:
        """It keeps int64 argmax indices of its output for the backward pass."""
        return self.kind == "pool"


def _walk(shape: tuple[int, ...], plan: list[tuple]) -> list[Layer]:
    layers = []
    for kind, *args in plan:
        if kind == "conv":  # Conv2d(in, out, kernel, padding), stride 1
            out_channels, kernel, padding = args
            channels, height, width = shape
            params = out_channels * channels * kernel * kernel + out_channels
            shape = (out_channels, height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1)
        elif kind == "pool":  # MaxPool2d(k)
            (k,) = args
            params, shape = 0, (shape[0], shape[1] // k, shape[2] // k)
        elif kind == "flatten":
            params, shape = 0, (math.prod(shape),)
        elif kind == "linear":
            (features,) = args
            params, shape = shape[0] * features + features, (features,)
        else:  # relu
            params = 0
        layers.append(Layer(kind, params, shape))
    return layers


def model_layers(model: str, meta: DatasetInfo) -> list[Layer]:
    """The layers of `learning.models.build(model, meta)`, as sizes."""
    if model == "cnn":  # learning.models.default_cnn
        plan = [("conv", 32, 5, 2), ("relu",), ("pool", 2), ("conv", 64, 5, 2), ("relu",), ("pool", 2), ("flatten",),
                ("linear", 128), ("relu",), ("linear", 64), ("relu",), ("linear", meta.classes)]
    elif model == "tiny":  # learning.models.tiny
        plan = [("flatten",), ("linear", meta.classes)]
    else:
        raise ValueError(f"--model {model!r}: choose one of {', '.join(MODELS)} (torchvision models are not sized yet)")
    return _walk(meta.shape, plan)


@dataclass(frozen=True)
class Parts:
    """Who holds which layers of a split model (as learning.cutting.cut cuts it)."""

    head: list[Layer]  # client
    body: list[Layer]  # server
    tail: list[Layer]  # client again, u-shaped mode
    cut_shape: tuple[int, ...]  # per sample, between head and body
    body_out: tuple[int, ...]  # per sample, what the server answers with in evaluation


class CannotSplit(ValueError):
    """The model cannot be cut as asked: a split run would fail."""


def cut_index(cut_layer: int | str | None) -> int:
    """The index a --cut-layer gives for cnn and tiny, whose layers are named by their indices."""
    if cut_layer is None:
        return DEFAULT_CUT
    if isinstance(cut_layer, int) or cut_layer.isdigit():
        return int(cut_layer)
    raise CannotSplit(f"unknown cut {cut_layer[:80]!r}: cnn and tiny are cut at a layer index")


def split_parts(layers: list[Layer], cut_layer: int | str | None, mode: str) -> Parts:
    """The halves as learning.cutting.cut makes them; CannotSplit where a run would fail."""
    cut_layer = cut_index(cut_layer)
    if mode not in SPLIT_MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {', '.join(SPLIT_MODES)}")
    end = len(layers) - (TAIL_LAYERS if mode == "u-shaped" else 0)
    if not 1 <= cut_layer < end:
        raise CannotSplit(f"cut layer {cut_layer} must be in 1..{end - 1} for a {len(layers)}-layer model in {mode} mode")
    head, body, tail = layers[:cut_layer], layers[cut_layer:end], layers[end:]
    for who, held in (("split-client", head + tail), ("split-server", body)):
        if not sum(layer.params for layer in held):
            raise CannotSplit(f"cut layer {cut_layer} leaves the {who} layers without parameters: its optimizer would have nothing to train")
    return Parts(head, body, tail, head[-1].out, body[-1].out)


def _outputs(layers: list[Layer], batch: int) -> float:
    """Bytes of every layer's output (views excepted) for one batch."""
    return batch * FLOAT32 * sum(layer.size for layer in layers if not layer.view)


def _indices(layers: list[Layer], batch: int) -> float:
    return batch * INT64 * sum(layer.size for layer in layers if layer.indices)


def _largest_pair(layers: list[Layer], input_size: int, batch: int) -> float:
    """The largest input + output of one layer (views excepted), in bytes, for one batch."""
    best, previous = 0, input_size
    for layer in layers:
        if not layer.view:
            best = max(best, previous + layer.size)
        previous = layer.size
    return batch * FLOAT32 * best


def training_activations(layers: list[Layer], input_size: int, batch: int) -> float:
    """Bytes (host) of training `layers` on one batch of `input_size` floats per sample."""
    return TRAIN_ACTIVATION_FACTOR * _outputs(layers, batch) + _indices(layers, batch) + batch * FLOAT32 * input_size


def evaluation_activations(layers: list[Layer], input_size: int, batch: int) -> float:
    """Bytes (host) of evaluating `layers` on one batch, without autograd."""
    return _outputs(layers, batch) + batch * FLOAT32 * input_size


def both_phases(training: float, evaluation: float) -> float:
    return max(training, evaluation) + OTHER_PHASE_RESIDUE * min(training, evaluation)


def gpu_activations(layers: list[Layer], input_size: int, batch: int, eval_batch: int | None) -> float:
    """Bytes on the device: outputs and their gradients while training, the largest pair in evaluation."""
    training = 2 * _outputs(layers, batch) + _indices(layers, batch) + batch * FLOAT32 * input_size if batch else 0.0
    evaluation = _largest_pair(layers, input_size, eval_batch) if eval_batch else 0.0
    return GPU_ALLOCATOR_ROUNDING * max(training, evaluation)


# -- the estimate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One term of a phase's sum, in MiB, with its own bounds."""

    name: str
    kind: str  # a key of UNCERTAINTY: which column of the table it falls in
    mib: float
    low: float
    high: float


def _part(name: str, kind: str, mib: float, high: float | None = None) -> Part:
    low_factor, high_factor = UNCERTAINTY[kind]
    return Part(name, kind, mib, mib * low_factor, (mib if high is None else high) * high_factor)


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def mib(self) -> float:
        return sum(part.mib for part in self.parts)

    @property
    def low(self) -> float:
        return sum(part.low for part in self.parts)

    @property
    def high(self) -> float:
        return sum(part.high for part in self.parts)


@dataclass(frozen=True)
class Estimate:
    """A role's estimated peak RSS, its bounds and breakdown, and the resources it suggests."""

    role: str
    settings: dict[str, Any]  # what it was estimated for: model, dataset, batch sizes, optimizer...
    torch_build: str | None  # None: the role imports no torch (relay)
    phases: tuple[Phase, ...]
    gpu: tuple[float, float, float] | None = None  # low, estimate, high (MiB of device memory); None without --gpu
    notes: tuple[str, ...] = field(default=())

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.mib)

    @property
    def mib(self) -> float:
        return self.peak.mib

    @property
    def low_mib(self) -> float:
        return max(phase.low for phase in self.phases)

    @property
    def high_mib(self) -> float:
        return max(phase.high for phase in self.phases)

    @property
    def request_mib(self) -> int:
        return rounded_up(self.mib)

    @property
    def limit_mib(self) -> int:
        """1.25 x the estimate (the chart's margin), never below the estimate's high bound."""
        return rounded_up(max(self.mib * LIMIT_MARGIN, self.high_mib))

    @property
    def request(self) -> str:
        return f"{self.request_mib}Mi"

    @property
    def limit(self) -> str:
        return f"{self.limit_mib}Mi"

    def columns(self) -> dict[str, float]:
        """The peak phase's parts summed by kind (the table's columns), in MiB."""
        found = dict.fromkeys(UNCERTAINTY, 0.0)
        for part in self.peak.parts:
            found[part.kind] += part.mib
        return found

    def resources(self) -> dict[str, Any]:
        """This role's entry in values.yaml."""
        entry: dict[str, Any] = {"resources": {"requests": {"memory": self.request}, "limits": {"memory": self.limit}}}
        if self.gpu is not None:
            entry["gpu"] = {"enabled": True}
        return entry

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role, "values_key": values_key(self.role), "settings": self.settings, "torch_build": self.torch_build,
            "peak_phase": self.peak.name, "mib": round(self.mib, 1), "low_mib": round(self.low_mib, 1), "high_mib": round(self.high_mib, 1),
            "request": self.request, "limit": self.limit, "columns": {k: round(v, 1) for k, v in self.columns().items()},
            "phases": [{"name": phase.name, "mib": round(phase.mib, 1), "low_mib": round(phase.low, 1), "high_mib": round(phase.high, 1),
                        "parts": {part.name: round(part.mib, 2) for part in phase.parts}} for phase in self.phases],
            "gpu": None if self.gpu is None else {
                "count": 1, "low_mib": round(self.gpu[0], 1), "mib": round(self.gpu[1], 1), "high_mib": round(self.gpu[2], 1),
            },
            "notes": list(self.notes),
        }


def rounded_up(mib: float) -> int:
    return math.ceil(mib / ROUND_TO_MIB) * ROUND_TO_MIB


def values_key(role: str) -> str:
    """The role's section in the chart's values: split-client -> splitClient."""
    first, *rest = role.split("-")
    return first + "".join(word.capitalize() for word in rest)


def settings_class(role: str) -> type:
    """The learning settings a role is sized from (the relay: the split session it forwards)."""
    classes = {"relay": SplitSettings, "split-client": SplitNNSettings, "split-server": SplitNNSettings, "split-fed": SplitNNSettings,
               # the tracker: the session it keeps (its own HyperedgeSettings, and how many peers), as the relay is sized from its split session
               "p2p-tracker": SMPLSettings, "p2p-peer": P2PSettings, "smpl-peer": SMPLSettings}
    if role in classes:
        return classes[role]
    if role in ("fedavg-server", "fedavg-worker"):
        return FederatedSettings  # the worker's PartitionSettings plus what only the server reads
    raise ValueError(f"--role {role!r}: choose one of {', '.join(ROLE_NAMES)}")


def share_fraction(partition: str, workers: int, classes: int) -> tuple[float, float]:
    """(estimate, high) of the largest worker share, as a fraction of the training set."""
    spec = parse_partition(partition, workers, classes)
    if spec.kind == "classes":  # balanced classes (true of the MNISTs; roughly of digits)
        largest = max(len(group) for group in spec.groups) / classes
        return largest, largest
    if spec.kind == "dirichlet":  # a small alpha can give one worker most of the data
        return 1 / workers, 1.0
    return 1 / workers, 1 / workers


def estimate(role: str, settings: Any = None, *, gpu: bool = False, torch_build: str | None = None) -> Estimate:
    """The peak memory of `role` run with `settings` (an instance of `settings_class(role)`, or None
    for its defaults). `torch_build`: cpu (the images) or cuda (the -cuda images; the default with
    `gpu`). ValueError names a setting a run would refuse."""
    cls = settings_class(role)
    settings = cls() if settings is None else settings
    if not isinstance(settings, cls):
        raise TypeError(f"{role} is sized from {cls.__name__}, not {type(settings).__name__}")
    if torch_build is None:
        torch_build = "cuda" if gpu else DEFAULT_TORCH_BUILD
    if torch_build not in TORCH_BUILDS:
        raise ValueError(f"--torch-build {torch_build!r}: choose one of {', '.join(TORCH_BUILDS)}")
    if gpu and role not in GPU_ROLES:
        raise ValueError(f"the {role} runs no model: it takes no GPU")
    if gpu and torch_build != "cuda":
        raise ValueError("--gpu runs the role's -cuda image, whose torch is the CUDA build: --torch-build cuda")
    return _ESTIMATORS[role](_Context(role, settings, torch_build, gpu))


def estimate_from(role: str, values: Mapping[str, Any], *, gpu: bool = False, torch_build: str | None = None) -> Estimate:
    """`estimate` from settings by field name (batch_size=128, ...); fields the role's settings do not
    have are ignored, and every value is checked as `splitfed run` checks it."""
    return estimate(role, config.build(settings_class(role), dict(values)), gpu=gpu, torch_build=torch_build)


@dataclass
class _Context:
    role: str
    settings: Any
    torch_build: str
    gpu: bool

    def __post_init__(self) -> None:
        s = self.settings
        self.meta = DATASETS[s.dataset]
        self.layers = model_layers(s.model, self.meta)
        self.pixels = math.prod(self.meta.shape)
        self.train_file = TRAIN_SAMPLES[s.dataset]
        self.test_file = TEST_SAMPLES[s.dataset]
        self.n_train = min(s.limit or self.train_file, self.train_file)
        self.n_test = min(s.test_limit or self.test_file, self.test_file)
        self.batch = min(s.batch_size, self.n_train)
        self.eval_batch = min(s.eval_batch_size, self.n_test)

    def described(self) -> dict[str, Any]:
        s = self.settings
        found = {"model": s.model, "dataset": s.dataset, "batch_size": s.batch_size, "eval_batch_size": s.eval_batch_size,
                 "optimizer": s.optimizer, "limit": s.limit, "test_limit": s.test_limit}
        if isinstance(s, SplitSettings):
            found.update(cut_layer=cut_index(s.cut_layer), mode=s.mode)
        elif isinstance(s, PeerSettings):
            found.update(peers=s.peers, partition=s.partition)
            if isinstance(s, SMPLSettings):
                found.update(hyperedge_size=s.hyperedge_size, max_hyperedges=s.max_hyperedges, local_parallel=s.local_parallel)
        else:
            found.update(workers=s.workers, partition=s.partition)
        return found

    # -- parts every role shares

    def baseline(self, torch: bool = True) -> list[Part]:
        parts = [_part("interpreter", "baseline", INTERPRETER_MIB)]
        if torch:
            parts.append(_part(f"torch import ({self.torch_build} build)", "baseline", TORCH_IMPORT_MIB[self.torch_build]))
            parts.append(_part("torch kernels", "overhead", TORCH_KERNELS_MIB))
        if torch and self.settings.dataset == "digits" and self.role != "split-server":
            parts.append(_part("scikit-learn (digits)", "overhead", SKLEARN_IMPORT_MIB))
        return parts

    def optimizer_import(self) -> Part:
        return _part("torch.optim import", "overhead", OPTIMIZER_IMPORT_MIB[self.torch_build])

    def runtime(self) -> Part:
        return _part("runtime", "overhead", RUNTIME_MIB)

    def model_state(self, params: int, trains: bool) -> list[Part]:
        size = params * FLOAT32 / MIB
        parts = [_part("parameters", "model", size)]
        if trains:
            parts.append(_part("gradients", "model", size))
            parts.append(_part(f"optimizer state ({self.settings.optimizer})", "model", OPTIMIZER_STATE[self.settings.optimizer] * size))
        return parts

    def raw(self, samples: int) -> float:
        """Bytes of an IDX file's pixels and labels as read (all of the file, whatever --limit)."""
        return samples * (self.pixels + 1)

    def labels(self, samples: int) -> float:
        return samples * INT64

    def gpu_memory(self, params: int, trains: bool, activations: float) -> tuple[float, float, float] | None:
        if not self.gpu:
            return None
        state = params * FLOAT32 * ((2 + OPTIMIZER_STATE[self.settings.optimizer]) if trains else 1) / MIB
        varying = state + activations / MIB
        low, mid, high = CUDA_CONTEXT_MIB
        return low + 0.8 * varying, mid + varying, high + 1.5 * varying

    def split(self) -> Parts:
        return split_parts(self.layers, self.settings.cut_layer, self.settings.mode)

    def split_message(self, parts: Parts) -> float:
        """Bytes of the largest message between the halves."""
        cut, out = math.prod(parts.cut_shape), math.prod(parts.body_out)
        train = self.batch * (FLOAT32 * cut + INT64)
        if self.settings.mode == "u-shaped":
            train = max(train, self.batch * FLOAT32 * out)
        return max(train, self.eval_batch * FLOAT32 * max(cut, out))


def _mib(value: float) -> float:
    return value / MIB


def _split_client(c: _Context) -> Estimate:
    parts = c.split()
    mine = parts.head + parts.tail
    params = sum(layer.params for layer in mine)
    training = training_activations(parts.head, c.pixels, c.batch) + (
        training_activations(parts.tail, math.prod(parts.body_out), c.batch) if parts.tail else 0.0)
    evaluation = evaluation_activations(parts.head, c.pixels, c.eval_batch) + (
        evaluation_activations(parts.tail, math.prod(parts.body_out), c.eval_batch) if parts.tail else 0.0)
    train_raw, test_raw = c.raw(c.train_file), c.raw(c.test_file)
    fixed = [*c.baseline(), c.optimizer_import(), *c.model_state(params, trains=True)]  # the optimizer is made before the data is read
    loading = Phase("loading data", (*fixed, _part("data being read", "data", _mib(max(2 * train_raw, train_raw + 2 * test_raw)))))
    running = Phase("training", (
        *fixed, c.runtime(),
        _part("data (uint8 train and test sets)", "data", _mib(train_raw + test_raw + c.labels(c.n_train + c.n_test))),
        _part("activations", "activations", _mib(both_phases(training, evaluation))),
        _part("messages", "messages", _mib(MESSAGE_COPIES * c.split_message(parts))),
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(parts.head, c.pixels, c.batch, c.eval_batch)
                       + (gpu_activations(parts.tail, math.prod(parts.body_out), c.batch, c.eval_batch) if parts.tail else 0.0))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, _gpu_note(c))


def _split_server(c: _Context) -> Estimate:
    parts = c.split()
    params = sum(layer.params for layer in parts.body)
    cut = math.prod(parts.cut_shape)
    training = training_activations(parts.body, cut, c.batch)  # its input needs a gradient too
    evaluation = evaluation_activations(parts.body, 0, c.eval_batch)  # its input is the message
    running = Phase("training", (
        *c.baseline(), c.optimizer_import(), c.runtime(), *c.model_state(params, trains=True),
        _part("activations", "activations", _mib(both_phases(training, evaluation))),
        _part("messages", "messages", _mib(MESSAGE_COPIES * c.split_message(parts))),
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(parts.body, cut, c.batch, c.eval_batch))
    return Estimate(c.role, c.described(), c.torch_build, (running,), gpu, _gpu_note(c))


def _relay(c: _Context) -> Estimate:
    parts = c.split()
    running = Phase("forwarding", (
        *c.baseline(torch=False), c.runtime(), _part("messages", "messages", _mib(MESSAGE_COPIES * c.split_message(parts))),
    ))
    return Estimate(c.role, c.described(), None, (running,))


def _split_fed(c: _Context) -> Estimate:
    """numpy only: one epoch's client layers from every client, each as its message and its
    decoded arrays, the average in float64 and as sent, and the last averages kept for late clients."""
    parts = c.split()
    layer_bytes = sum(layer.params for layer in parts.head + parts.tail) * FLOAT32
    held = (2 * c.settings.clients + 2 + 2) * layer_bytes + 2 * layer_bytes  # + the float64 accumulator
    running = Phase("averaging", (*c.baseline(torch=False), c.runtime(), _part("client layers", "messages", _mib(held))))
    return Estimate(c.role, c.described(), None, (running,))


def _fedavg_server(c: _Context) -> Estimate:
    params = sum(layer.params for layer in c.layers)
    model_bytes = params * FLOAT32
    test_raw = c.raw(c.test_file)
    # The model encoded for each worker; each update held as its unacknowledged body and as a
    # flat vector, all of them stacked, and the aggregate.
    messages = (3 * c.settings.workers + 4) * model_bytes
    fixed = [*c.baseline(), *c.model_state(params, trains=False)]
    loading = Phase("loading data", (*fixed, _part("data being read", "data", _mib(2 * test_raw))))
    running = Phase("aggregating", (
        *fixed, c.runtime(),
        _part("data (uint8 test set)", "data", _mib(test_raw + c.labels(c.n_test))),
        _part("activations", "activations", _mib(evaluation_activations(c.layers, c.pixels, c.eval_batch))),
        _part("messages", "messages", _mib(messages)),
    ))
    gpu = c.gpu_memory(params, False, gpu_activations(c.layers, c.pixels, 0, c.eval_batch))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, _gpu_note(c))


def _fedavg_worker(c: _Context) -> Estimate:
    s = c.settings
    params = sum(layer.params for layer in c.layers)
    fraction, high_fraction = share_fraction(s.partition, s.workers, c.meta.classes)
    # The worker reads the whole training set and keeps its share, both as uint8 pixels.
    share, high_share = (math.ceil(c.n_train * f) * c.pixels for f in (fraction, high_fraction))
    raw = c.raw(c.train_file)
    loading = Phase("loading data", (
        *c.baseline(), *c.model_state(params, trains=False),
        _part("data being read", "data", _mib(max(2 * raw, raw + share)), _mib(max(2 * raw, raw + high_share))),
    ))
    running = Phase("training", (
        *c.baseline(), c.optimizer_import(), c.runtime(), *c.model_state(params, trains=True),
        _part("data (uint8 share)", "data", _mib(share + c.labels(c.n_train)), _mib(high_share + c.labels(c.n_train))),
        _part("activations", "activations", _mib(training_activations(c.layers, c.pixels, c.batch))),
        _part("messages", "messages", _mib(4 * params * FLOAT32)),  # the model received, decoded and copied; the update encoded
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(c.layers, c.pixels, c.batch, None))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, _gpu_note(c))


def _p2p_tracker(c: _Context) -> Estimate:
    """No torch, no data, no model: the membership (every peer's entry, sent to every live peer
    in each list) and the reports it keeps for the run's result."""
    s = c.settings
    planned = s.hyperepochs if isinstance(s, SMPLSettings) else getattr(s, "epochs", 1)
    held = s.peers * TRACKER_PEER_BYTES + s.peers * planned * TRACKER_REPORT_BYTES
    running = Phase("tracking", (*c.baseline(torch=False), c.runtime(), _part("membership and reports", "messages", _mib(held))))
    return Estimate(c.role, c.described(), None, (running,))


def _peer_parts(c: _Context, copies: float, training: float) -> tuple[tuple[Phase, ...], tuple[float, float, float] | None]:
    """A decentralized peer, like a fedavg-worker that also evaluates: it reads the training set
    and keeps its share (uint8), holds the test set, the whole model and one optimiser, trains at the
    batch size and scores the test set at the evaluation batch size (before and after averaging), and
    holds `copies` of the model in messages (bytes on the wire, decoded arrays, averages)."""
    s = c.settings
    params = sum(layer.params for layer in c.layers)
    fraction, high_fraction = share_fraction(s.partition, s.peers, c.meta.classes)
    share, high_share = (math.ceil(c.n_train * f) * c.pixels for f in (fraction, high_fraction))
    train_raw, test_raw = c.raw(c.train_file), c.raw(c.test_file)
    loading = Phase("loading data", (
        *c.baseline(), _part("data being read", "data", _mib(max(2 * train_raw, train_raw + share)), _mib(max(2 * train_raw, train_raw + high_share))),
    ))
    evaluation = evaluation_activations(c.layers, c.pixels, c.eval_batch)
    running = Phase("training", (
        *c.baseline(), c.optimizer_import(), c.runtime(), *c.model_state(params, trains=True),
        _part("data (uint8 share and test set)", "data", _mib(share + test_raw + c.labels(c.n_train + c.n_test)),
              _mib(high_share + test_raw + c.labels(c.n_train + c.n_test))),
        _part("activations", "activations", _mib(both_phases(training, evaluation))),
        _part("messages", "messages", _mib(copies * params * FLOAT32)),
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(c.layers, c.pixels, c.batch, c.eval_batch))
    return (loading, running), gpu


def _p2p_peer(c: _Context) -> Estimate:
    """Its own model and the encoded copy it sends to every live peer; each arriving model as its
    body and its decoded arrays; the average and its float64 accumulator."""
    copies = 2 * (c.settings.peers - 1) + 4
    phases, gpu = _peer_parts(c, copies, training_activations(c.layers, c.pixels, c.batch))
    return Estimate(c.role, c.described(), c.torch_build, phases, gpu, _gpu_note(c))


def _smpl_peer(c: _Context) -> Estimate:
    """The snapshot and a start model (and its message); per open hyperedge its own change in
    float64, sent as indices and values (3 x the model) and kept dense, each member's change as its
    body and dense, and the correction. With --local-parallel hogwild, each of --local-workers
    threads holds a batch's activations of its own."""
    s = c.settings
    copies = 3 + s.max_hyperedges * (8 + 4 * (s.hyperedge_size - 1))
    threads = s.local_workers if s.local_parallel == "hogwild" else 1
    phases, gpu = _peer_parts(c, copies, threads * training_activations(c.layers, c.pixels, c.batch))
    return Estimate(c.role, c.described(), c.torch_build, phases, gpu, _gpu_note(c))


def _gpu_note(c: _Context) -> tuple[str, ...]:
    if not c.gpu:
        return ()
    return (("GPU memory is what the role's model would hold on the device; the roles compute on the CPU as of this "
             "version, so the CUDA build's larger import is what gpu.enabled costs today"),)


_ESTIMATORS = {
    "relay": _relay, "split-client": _split_client, "split-server": _split_server, "split-fed": _split_fed,
    "fedavg-server": _fedavg_server, "fedavg-worker": _fedavg_worker,
    "p2p-tracker": _p2p_tracker, "p2p-peer": _p2p_peer, "smpl-peer": _smpl_peer,
}


# -- Kubernetes quantities and the chart's values ------------------------------------------------

_QUANTITY = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?")
_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(quantity: str | int | float) -> int:
    """Bytes in a Kubernetes memory quantity ("640Mi", "1Gi", "600M", "1e9", "129974848"), rounded
    up to a whole byte as Kubernetes does; ValueError for anything else."""
    if isinstance(quantity, bool) or not isinstance(quantity, (str, int, float)):
        raise ValueError(f"memory quantity {quantity!r}: not a Kubernetes quantity")
    text = str(quantity).strip() if not isinstance(quantity, float) else repr(quantity)
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"memory quantity {str(quantity)[:40]!r}: not a Kubernetes quantity (such as 512Mi, 1Gi, 600M or a number of bytes)")
    suffix = match["suffix"] or ""
    try:
        scale = _SUFFIXES[suffix] if suffix in _SUFFIXES else Decimal(10) ** int(suffix[1:])
        value = Decimal(match["number"]) * scale
    except (ArithmeticError, ValueError):
        raise ValueError(f"memory quantity {str(quantity)[:40]!r}: out of range") from None
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def check_fits(estimate: Estimate, limit: str | int | None) -> str | None:
    """A warning when the memory `limit` (a Kubernetes quantity; None: no limit) is below the
    estimated peak of `estimate`; None when it fits."""
    if limit is None:
        return None
    limit_bytes = parse_quantity(limit)
    if limit_bytes >= estimate.mib * MIB:
        return None
    s = estimate.settings
    what = f"{s['model']} on {s['dataset']}, batch {s['batch_size']}, eval batch {s['eval_batch_size']}, {s['optimizer']}"
    return (f"{estimate.role}: memory limit {limit} ({limit_bytes / MIB:.0f} MiB) is below its estimated peak of {estimate.mib:.0f} MiB "
            f"({what}; {estimate.torch_build or 'no'} torch): it would be OOM-killed; set {values_key(estimate.role)}.resources.limits.memory "
            f"to {estimate.limit} (splitfed size --role {estimate.role})")


def family_of(values: Mapping[str, Any], role: str) -> str:
    """The family whose shared settings the chart gives `role` (templates/_role.tpl): the
    p2p-tracker takes its peers' (smpl with smplPeer.enabled, else p2p)."""
    if role in SPLIT_ROLES:
        return "split"
    if role == "p2p-tracker":
        return "smpl" if (values.get("smplPeer") or {}).get("enabled") and not (values.get("p2pPeer") or {}).get("enabled") else "p2p"
    if role in PEER_ROLES:
        return role.split("-")[0]
    return "fedavg"


def role_settings(values: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The learning settings (by field name, checked) the chart gives `role`: data.dataset, the
    family's shared settings, then the role's own, which win; the workers are fedavgWorker.replicas,
    the clients splitClient.replicas, the peers p2pPeer.replicas or smplPeer.replicas (the tracker's too, when its peers are SMPL's,
    whose hyperedges it draws)."""
    family = family_of(values, role)
    merged = dict((values.get(family) or {}).get("settings") or {})
    merged.update(((values.get(values_key(role)) or {}).get("settings")) or {})
    dataset = (values.get("data") or {}).get("dataset")
    if dataset is not None:
        merged["dataset"] = dataset
    if family == "fedavg" and (values.get("fedavgWorker") or {}).get("replicas"):
        merged["workers"] = values["fedavgWorker"]["replicas"]
    if family == "split" and (values.get("splitClient") or {}).get("replicas"):
        merged["clients"] = values["splitClient"]["replicas"]
    peers = (values.get(f"{family}Peer") or {}).get("replicas") if family in ("p2p", "smpl") else None
    if peers and (role in PEER_ROLES or family == "smpl"):
        merged["peers"] = peers
    found = {}
    for option in config.options(settings_class(role)):
        value = merged.get(option.flag[2:])
        if value is not None:
            found[option.name] = option.parse(option.text(value))
    return found


def check_values(values: Mapping[str, Any], torch_build: str | None = None) -> list[str]:
    """Warnings, one per enabled role of the chart's (merged) `values` whose memory limit is below
    its estimated peak. A role with gpu.enabled is sized with the CUDA build its image carries."""
    warnings = []
    for role in ROLE_NAMES:
        section = values.get(values_key(role)) or {}
        if not section.get("enabled") or section.get("replicas", 1) == 0:
            continue
        gpu = bool((section.get("gpu") or {}).get("enabled"))
        found = estimate(role, config.build(settings_class(role), role_settings(values, role)), torch_build=torch_build or ("cuda" if gpu else None))
        limit = ((section.get("resources") or {}).get("limits") or {}).get("memory")
        if warning := check_fits(found, limit):
            warnings.append(warning)
    return warnings
