"""The per-role estimators: for each role, the parts of its peak RSS (and, with a GPU, of its
device memory) from its learning settings, as sums over the models' shapes and the measured
constants. The shapes and sample counts come from `shapes` and the built-in data sets'
`DatasetInfo`, torch-free; for a task, a party's own data or a torchvision model, from
`task_sizes`, which reads them with torch. A role's peak RSS is the larger of two phases, each a
sum of parts:
- loading its data: the interpreter and torch, plus the data set while it is read and converted;
- running: the interpreter and torch, the data it keeps, its layers' parameters, gradients and
  optimiser state, the activations of its layers at the batch size (training) and at the
  evaluation batch size, the messages it holds as bytes, and framework overhead."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from splitfed import config
from splitfed.learning.context import has_placeholders
from splitfed.learning.settings import (
    DATASETS, LOCAL_FORMATS, DatasetInfo, FederatedSettings, ModelSettings, P2PSettings, PeerSettings, SMPLSettings,
    SplitNNSettings, SplitSettings, parse_partition,
)
from splitfed.roles.p2p.common import TRACKER
from splitfed.roles.registry import ROLES
from splitfed.sizing.parts import Estimate, Part, Phase
from splitfed.sizing.measured import (
    CUDA_CONTEXT_MIB, DEFAULT_TORCH_BUILD, FLOAT32, GPU_ALLOCATOR_ROUNDING, INT64, INTERPRETER_MIB, MESSAGE_COPIES, MIB,
    OPTIMIZER_IMPORT_MIB, OPTIMIZER_STATE, OTHER_PHASE_RESIDUE, READER_IMPORT_MIB, RUNTIME_MIB, TORCH_BUILDS,
    TORCH_IMPORT_MIB, TORCH_KERNELS_MIB, TRACKER_PEER_BYTES, TRACKER_REPORT_BYTES, TRAIN_ACTIVATION_FACTOR,
    UNCERTAINTY,
)
from splitfed.sizing.shapes import Layer, NotSized, OwnData, Parts, Sized, cut_index, model_layers, parts_at, split_parts, walks

ROLE_NAMES = tuple(ROLES)
GPU_ROLES = tuple(name for name, spec in ROLES.items() if spec.torch)  # only a role that runs torch can be given a GPU


def _part(name: str, kind: str, mib: float, high: float | None = None) -> Part:
    low_factor, high_factor = UNCERTAINTY[kind]
    return Part(name, kind, mib, mib * low_factor, (mib if high is None else high) * high_factor)


# -- activations ----------------------------------------------------------------------------------


def _outputs(layers: list[Layer], batch: int) -> float:
    """Bytes of every layer's outputs (views excepted) for one batch."""
    return batch * FLOAT32 * sum(layer.floats for layer in layers)


def _indices(layers: list[Layer], batch: int) -> float:
    return batch * INT64 * sum(layer.int64s for layer in layers)


def _largest_pair(layers: list[Layer], input_size: int, batch: int) -> float:
    """The largest input + outputs of one layer (views excepted), in bytes, for one batch."""
    best, previous = 0, input_size
    for layer in layers:
        if not layer.view:
            best = max(best, previous + layer.floats)
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


# -- the estimate of a role ----------------------------------------------------------------------


def settings_class(role: str) -> type:
    """The learning settings a role is sized from (the relay: the split session it forwards)."""
    if role not in _ESTIMATORS:
        raise ValueError(f"--role {role!r}: choose one of {', '.join(ROLE_NAMES)}")
    return _ESTIMATORS[role][0]


def sizes_model(role: str) -> bool:
    """Whether the role's estimate depends on the model and its data (all but the tracker's)."""
    return role != TRACKER


def reads_with_torch(settings: ModelSettings) -> bool:
    """Whether sizing `settings` takes torch (`task_sizes`): a task, a party's own data (a local
    format, or a folder per party), or a model the shape walk does not describe."""
    return bool(settings.task) or settings.dataset in LOCAL_FORMATS or has_placeholders(settings.data_dir) or not walks(settings.model)


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
    `gpu`). ValueError names a setting a run would refuse; NotSized says why the role cannot be
    sized from here (its task or data cannot be read, its model cannot be probed)."""
    cls = settings_class(role)
    settings = cls() if settings is None else settings
    if not isinstance(settings, cls):
        raise TypeError(f"{role} is sized from {cls.__name__}, not {type(settings).__name__}")
    if torch_build is None:
        torch_build = "cuda" if gpu else DEFAULT_TORCH_BUILD
    if torch_build not in TORCH_BUILDS:
        raise ValueError(f"--torch-build {torch_build!r}: choose one of {', '.join(TORCH_BUILDS)}")
    if gpu and not ROLES[role].torch:
        raise ValueError(f"the {role} runs no model: it takes no GPU")
    if gpu and torch_build != "cuda":
        raise ValueError("--gpu runs the role's -cuda image, whose torch is the CUDA build: --torch-build cuda")
    return _ESTIMATORS[role][1](_Context(role, settings, torch_build, gpu))


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

    @cached_property
    def sized(self) -> Sized:
        """The model's layers and the data's shape (and a party's own data): computed when an
        estimator first asks, so that the tracker, which holds neither, never builds them."""
        s = self.settings
        if reads_with_torch(s):
            try:
                from splitfed.sizing import task_sizes  # torch: only for a task, own data or a torchvision model
            except ImportError as exc:
                raise NotSized(f"sizing a task, a party's own data or a torchvision model takes torch, which cannot be imported here ({exc})") from None
            return task_sizes.size_task(self.role, s)
        return Sized(self.meta.shape, tuple(model_layers(s.model, self.meta)))

    @cached_property
    def meta(self) -> DatasetInfo:
        """The built-in data set the parties share out."""
        if self.settings.dataset not in DATASETS:
            raise NotSized(f"unknown data set {self.settings.dataset!r}: sizing knows {', '.join(DATASETS)} and a party's own "
                           f"{', '.join(LOCAL_FORMATS)} files")
        return DATASETS[self.settings.dataset]

    @property
    def layers(self) -> list[Layer]:
        return list(self.sized.layers)

    @property
    def own(self) -> OwnData | None:
        return self.sized.own

    @property
    def pixels(self) -> int:
        """Input values per sample."""
        return math.prod(self.sized.shape)

    @property
    def train_file(self) -> int:
        return self.meta.train_samples

    @property
    def test_file(self) -> int:
        return self.meta.test_samples

    @property
    def n_train(self) -> int | None:
        """Training samples the role uses (--limit applied); None: unknown here (a split-server's clients' own)."""
        if self.own is not None:
            return self.own.train_samples
        return min(self.settings.limit or self.train_file, self.train_file)

    @property
    def n_test(self) -> int | None:
        if self.own is not None:
            return self.own.test_samples
        return min(self.settings.test_limit or self.test_file, self.test_file)

    @property
    def batch(self) -> int:
        return min(self.settings.batch_size, self.n_train or self.settings.batch_size)

    @property
    def eval_batch(self) -> int:
        return min(self.settings.eval_batch_size, self.n_test or self.settings.eval_batch_size)

    def described(self) -> dict[str, Any]:
        s = self.settings
        found = {"model": s.model, "dataset": s.dataset, "batch_size": s.batch_size, "eval_batch_size": s.eval_batch_size,
                 "optimizer": s.optimizer, "limit": s.limit, "test_limit": s.test_limit}
        if s.task:
            found["task"] = s.task
        if s.data_dir is not None:
            found["data_dir"] = str(s.data_dir)
        if isinstance(s, SplitSettings):
            found.update(cut_layer=self.sized.cut[0] if self.sized.cut else cut_index(s.cut_layer), mode=s.mode)
        elif isinstance(s, PeerSettings):
            found.update(peers=s.peers, partition=s.partition)
            if isinstance(s, SMPLSettings):
                found.update(hyperedge_size=s.hyperedge_size, max_hyperedges=s.max_hyperedges, local_parallel=s.local_parallel)
        else:
            found.update(workers=s.workers, partition=s.partition)
        sized = self._sized_already()
        if sized is not None and sized.own is not None and sized.own.samples:
            own = sized.own
            found["own_data"] = {"source": own.source, "train_samples": own.train_samples, "test_samples": own.test_samples}
        return found

    def _sized_already(self) -> Sized | None:
        """`sized` if an estimator has asked for it (the tracker never does), without computing it."""
        return self.__dict__.get("sized")  # where cached_property keeps it

    def notes(self) -> tuple[str, ...]:
        sized = self._sized_already()
        found = sized.notes if sized is not None else ()
        if self.gpu:
            found += (("GPU memory is what the role holds on its device (its --device: cuda where the chart's gpu.enabled is set): the "
                       "model, its gradients and optimiser state, the activations (in fp32) and the CUDA context; the memory above still "
                       "counts them on the CPU, so on a GPU it errs high"),)
        return found

    # -- parts every role shares

    def baseline(self, torch: bool = True) -> list[Part]:
        parts = [_part("interpreter", "baseline", INTERPRETER_MIB)]
        if torch:
            parts.append(_part(f"torch import ({self.torch_build} build)", "baseline", TORCH_IMPORT_MIB[self.torch_build]))
            parts.append(_part("torch kernels", "overhead", TORCH_KERNELS_MIB))
        # A built-in data set whose reader imports a library of its own (digits: scikit-learn), in the roles that read it.
        if torch and self.own is None and self.role != "split-server" and self.meta.reader in READER_IMPORT_MIB:
            parts.append(_part(f"{self.meta.name} reader's imports", "overhead", READER_IMPORT_MIB[self.meta.reader]))
        return parts

    def own_data(self) -> tuple[Part, Part]:
        """A party's own data: (while it is read, as kept). Nothing is shared out: it keeps all it reads."""
        own = self.own
        return (_part(f"data being read ({own.source})", "data", _mib(own.read_bytes)),
                _part(f"data (its own, {own.source})", "data", _mib(own.held_bytes)))

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
        """Bytes of a built-in data set's pixels and labels as read (all of the file, whatever --limit)."""
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
        if self.sized.cut is not None:  # cut with torch, as learning.cutting cuts the model (task_sizes)
            return parts_at(self.layers, *self.sized.cut)
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
    fixed = [*c.baseline(), c.optimizer_import(), *c.model_state(params, trains=True)]  # the optimizer is made before the data is read
    if c.own is not None:
        reading, kept = c.own_data()
    else:
        train_raw, test_raw = c.raw(c.train_file), c.raw(c.test_file)
        reading = _part("data being read", "data", _mib(max(2 * train_raw, train_raw + 2 * test_raw)))
        kept = _part("data (uint8 train and test sets)", "data", _mib(train_raw + test_raw + c.labels(c.n_train + c.n_test)))
    loading = Phase("loading data", (*fixed, reading))
    running = Phase("training", (
        *fixed, c.runtime(), kept,
        _part("activations", "activations", _mib(both_phases(training, evaluation))),
        _part("messages", "messages", _mib(MESSAGE_COPIES * c.split_message(parts))),
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(parts.head, c.pixels, c.batch, c.eval_batch)
                       + (gpu_activations(parts.tail, math.prod(parts.body_out), c.batch, c.eval_batch) if parts.tail else 0.0))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, c.notes())


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
    return Estimate(c.role, c.described(), c.torch_build, (running,), gpu, c.notes())


def _relay(c: _Context) -> Estimate:
    parts = c.split()
    running = Phase("forwarding", (
        *c.baseline(torch=False), c.runtime(), _part("messages", "messages", _mib(MESSAGE_COPIES * c.split_message(parts))),
    ))
    return Estimate(c.role, c.described(), None, (running,), None, c.notes())


def _split_fed(c: _Context) -> Estimate:
    """numpy only: one epoch's client layers from every client, each as its message and its
    decoded arrays, the average in float64 and as sent, and the last averages kept for late clients."""
    parts = c.split()
    layer_bytes = sum(layer.params for layer in parts.head + parts.tail) * FLOAT32
    held = (2 * c.settings.clients + 2 + 2) * layer_bytes + 2 * layer_bytes  # + the float64 accumulator
    running = Phase("averaging", (*c.baseline(torch=False), c.runtime(), _part("client layers", "messages", _mib(held))))
    return Estimate(c.role, c.described(), None, (running,), None, c.notes())


def _fedavg_server(c: _Context) -> Estimate:
    params = sum(layer.params for layer in c.layers)
    model_bytes = params * FLOAT32
    # The model encoded for each worker; each update held as its unacknowledged body and as a
    # flat vector, all of them stacked, and the aggregate.
    messages = (3 * c.settings.workers + 4) * model_bytes
    fixed = [*c.baseline(), *c.model_state(params, trains=False)]
    if c.own is not None:
        reading, kept = c.own_data()
    else:
        test_raw = c.raw(c.test_file)
        reading, kept = _part("data being read", "data", _mib(2 * test_raw)), _part("data (uint8 test set)", "data", _mib(test_raw + c.labels(c.n_test)))
    loading = Phase("loading data", (*fixed, reading))
    running = Phase("aggregating", (
        *fixed, c.runtime(), kept,
        _part("activations", "activations", _mib(evaluation_activations(c.layers, c.pixels, c.eval_batch))),
        _part("messages", "messages", _mib(messages)),
    ))
    gpu = c.gpu_memory(params, False, gpu_activations(c.layers, c.pixels, 0, c.eval_batch))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, c.notes())


def _reading_a_share(c: _Context, parties: int) -> tuple[Part, int, int]:
    """A party of `parties` sharing one built-in set out: it reads the whole training set and keeps
    its share, both as uint8 pixels. (The part while reading, the share's bytes, their high bound.)"""
    fraction, high_fraction = share_fraction(c.settings.partition, parties, c.meta.classes)
    share, high_share = (math.ceil(c.n_train * f) * c.pixels for f in (fraction, high_fraction))
    raw = c.raw(c.train_file)
    return _part("data being read", "data", _mib(max(2 * raw, raw + share)), _mib(max(2 * raw, raw + high_share))), share, high_share


def _fedavg_worker(c: _Context) -> Estimate:
    s = c.settings
    params = sum(layer.params for layer in c.layers)
    if c.own is not None:
        reading, kept = c.own_data()
    else:
        reading, share, high_share = _reading_a_share(c, s.workers)
        kept = _part("data (uint8 share)", "data", _mib(share + c.labels(c.n_train)), _mib(high_share + c.labels(c.n_train)))
    loading = Phase("loading data", (*c.baseline(), *c.model_state(params, trains=False), reading))
    running = Phase("training", (
        *c.baseline(), c.optimizer_import(), c.runtime(), *c.model_state(params, trains=True), kept,
        _part("activations", "activations", _mib(training_activations(c.layers, c.pixels, c.batch))),
        _part("messages", "messages", _mib(4 * params * FLOAT32)),  # the model received, decoded and copied; the update encoded
    ))
    gpu = c.gpu_memory(params, True, gpu_activations(c.layers, c.pixels, c.batch, None))
    return Estimate(c.role, c.described(), c.torch_build, (loading, running), gpu, c.notes())


def _p2p_tracker(c: _Context) -> Estimate:
    """No torch, no data, no model: the membership (every peer's entry, sent to every live peer
    in each list) and the reports it keeps for the run's result."""
    s = c.settings
    planned = s.hyperepochs if isinstance(s, SMPLSettings) else getattr(s, "epochs", 1)
    held = s.peers * TRACKER_PEER_BYTES + s.peers * planned * TRACKER_REPORT_BYTES
    running = Phase("tracking", (*c.baseline(torch=False), c.runtime(), _part("membership and reports", "messages", _mib(held))))
    return Estimate(c.role, c.described(), None, (running,), None, c.notes())


def _peer_parts(c: _Context, copies: float, training: float) -> tuple[tuple[Phase, ...], tuple[float, float, float] | None]:
    """A decentralized peer, like a fedavg-worker that also evaluates: it reads the training set
    and keeps its share (uint8), holds the test set, the whole model and one optimiser, trains at the
    batch size and scores the test set at the evaluation batch size (before and after averaging), and
    holds `copies` of the model in messages (bytes on the wire, decoded arrays, averages)."""
    s = c.settings
    params = sum(layer.params for layer in c.layers)
    if c.own is not None:
        reading, kept = c.own_data()
    else:
        reading, share, high_share = _reading_a_share(c, s.peers)
        test_raw = c.raw(c.test_file)
        kept = _part("data (uint8 share and test set)", "data", _mib(share + test_raw + c.labels(c.n_train + c.n_test)),
                     _mib(high_share + test_raw + c.labels(c.n_train + c.n_test)))
    loading = Phase("loading data", (*c.baseline(), reading))
    evaluation = evaluation_activations(c.layers, c.pixels, c.eval_batch)
    running = Phase("training", (
        *c.baseline(), c.optimizer_import(), c.runtime(), *c.model_state(params, trains=True), kept,
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
    return Estimate(c.role, c.described(), c.torch_build, phases, gpu, c.notes())


def _smpl_peer(c: _Context) -> Estimate:
    """The snapshot and a start model (and its message); per open hyperedge its own change in
    float64, sent as indices and values (3 x the model) and kept dense, each member's change as its
    body and dense, and the correction. With --start mean, per hyperedge that is starting its own
    model, each other member's as its body and its arrays, and their mean with its float64
    accumulator. With --local-parallel hogwild, each of --local-workers threads holds a batch's
    activations of its own."""
    s = c.settings
    starting = 2 * (s.hyperedge_size - 1) + 4 if s.start == "mean" else 0
    copies = 3 + s.max_hyperedges * (8 + 4 * (s.hyperedge_size - 1) + starting)
    threads = s.local_workers if s.local_parallel == "hogwild" else 1
    phases, gpu = _peer_parts(c, copies, threads * training_activations(c.layers, c.pixels, c.batch))
    return Estimate(c.role, c.described(), c.torch_build, phases, gpu, c.notes())


# role -> (the learning settings it is sized from, its estimator)
_ESTIMATORS: dict[str, tuple[type, Callable[[_Context], Estimate]]] = {
    "relay": (SplitSettings, _relay), "split-client": (SplitNNSettings, _split_client), "split-server": (SplitNNSettings, _split_server),
    "split-fed": (SplitNNSettings, _split_fed),
    # the worker's PartitionSettings plus what only the server reads
    "fedavg-server": (FederatedSettings, _fedavg_server), "fedavg-worker": (FederatedSettings, _fedavg_worker),
    # the tracker: the session it keeps (its own HyperedgeSettings, and how many peers), as the relay is sized from its split session
    "p2p-tracker": (SMPLSettings, _p2p_tracker), "p2p-peer": (P2PSettings, _p2p_peer), "smpl-peer": (SMPLSettings, _smpl_peer),
}
