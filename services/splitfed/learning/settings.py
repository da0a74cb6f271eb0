"""Learning settings and data set facts, kept free of torch so that torch-free roles (relay,
tracker) and the CLI can share them. Deployment (sessions, brokers, keys) lives with the roles.

Each field is one CLI flag and one SPLITFED_* variable (see `splitfed.config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from splitfed.config import setting
from splitfed.learning.context import has_placeholders


@dataclass(frozen=True)
class DataShape:
    """What a model is built for: one sample's input shape and the number of classes."""

    name: str
    shape: tuple[int, ...]  # (C, H, W) images, (F,) features
    classes: int


@dataclass(frozen=True)
class DatasetInfo(DataShape):
    """A built-in data set: everything any part of splitfed knows of it, in this one place."""

    mean: float  # one mean and std over all pixels, in 0..1 units (digits: in its own 0..16)
    std: float
    reader: str  # how learning.data reads its files: idx, digits or cifar10
    train_samples: int  # samples in its training and test files (sizing counts them: --limit still reads the whole file)
    test_samples: int


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, 0.2860, 0.3530, "idx", 60000, 10000),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, 0.1307, 0.3081, "idx", 60000, 10000),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, 4.884, 6.017, "digits", 1437, 360),  # a fixed 80/20 cut of scikit-learn's 1797
    # One mean and std over all three channels (Images normalises with scalars): the per-channel
    # means 0.4914, 0.4822, 0.4465 and stds 0.2470, 0.2435, 0.2616, pooled.
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, 0.4734, 0.2516, "cifar10", 50000, 10000),
}
LOCAL_FORMATS = ("imagefolder", "csv", "npz")  # a party's own files under --data-dir (learning.local_data)
MODELS = ("cnn", "tiny")  # built by learning.models; --model also takes a torchvision classification model (learning.vision)
OPTIMIZERS = ("adam", "sgd")  # built by learning.train
SPLIT_MODES = ("vanilla", "u-shaped")
GRADIENT_DEFENCES = ("none", "max-norm", "noise")  # learning.defences: what a u-shaped client does to the gradients it returns
LABEL_PRIORS = ("none", "model")
SCHEDULES = ("round-robin", "splitfed-v1", "splitfed-v2")  # roles.split: how several split clients share one server
STRATEGIES = ("fedavg", "fedprox", "median", "trimmed-mean", "krum", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedrs", "fedbabu", "fedlc")  # learning.strategies
RULES = ("mean", "median", "trimmed-mean", "krum")
CALIBRATIONS = ("none", "ccvr")  # learning.calibration
EVALUATIONS = ("server", "parties", "both")
PRECISIONS = ("fp32", "bf16", "fp16")  # learning.device: what autocast computes in, and the dtypes split learning may send
WIRE_NUMPY_DTYPES = {"fp32": "float32", "bf16": "uint16", "fp16": "float16"}  # numpy has no bfloat16: it travels as its 16 bits
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed `--partition`: how the training data is shared out among the workers."""

    kind: str  # iid | classes | dirichlet | shards
    groups: tuple[tuple[int, ...], ...] = ()  # classes: each worker's classes
    alpha: float = 0.0  # dirichlet
    shards: int = 0  # shards per worker


def parse_partition(spec: str, parts: int, classes: int) -> PartitionSpec:
    """Check `spec` against the number of workers and the data set's classes; ValueError says why."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "iid" and not arg:
            return PartitionSpec("iid")
        if kind == "classes":
            groups = tuple(_class_group(group, classes) for group in arg.split(","))
            if len(groups) != parts:
                raise ValueError(f"it names {len(groups)} groups of classes for {parts} workers")
            return PartitionSpec("classes", groups=groups)
        if kind == "dirichlet":
            alpha = float(arg)
            if not 0 < alpha < float("inf"):
                raise ValueError("ALPHA must be a positive number")
            return PartitionSpec("dirichlet", alpha=alpha)
        if kind == "shards":
            shards = int(arg)
            if shards < 1:
                raise ValueError("K must be at least 1")
            return PartitionSpec("shards", shards=shards)
    except ValueError as exc:
        raise ValueError(f"--partition {spec!r}: {exc}") from None
    raise ValueError(f"--partition {spec!r}: use iid, classes:0-3,4-6,7-9, dirichlet:ALPHA or shards:K")


def _class_group(group: str, classes: int) -> tuple[int, ...]:
    low, _, high = group.partition("-")
    first, last = int(low), int(high or low)
    if not 0 <= first <= last < classes:
        raise ValueError(f"classes {group!r} are not a range within 0-{classes - 1}")
    return tuple(range(first, last + 1))


@dataclass(kw_only=True)
class ModelSettings:
    """The model, its data and how it is optimised: what every way of training it shares."""

    task: str | None = setting(
        None, "Your own model and data: a Python file (PATH.py) or an importable module (package.module) defining model(context) and/or "
        "data(context, train), optionally loss(context) and classes. What it does not define comes from --model and --dataset.", metavar="TASK",
    )
    dataset: str = setting(
        "fashion-mnist", "Data set: a built-in one, shared out among the parties by --partition, or a party's own files under --data-dir: "
        "imagefolder (train/ and test/, one sub-folder of PNG or JPEG images per class), csv (train.csv, test.csv) or npz (train.npz, test.npz "
        "with arrays x and y).", choices=(*DATASETS, *LOCAL_FORMATS),
    )
    data_dir: Path | None = setting(
        None, "The data folder (IDX files of mnist or fashion-mnist, cifar-10 batches, or the party's own files). {party} and {index} "
        "in it become each party's name and index (data/{party}: data/worker-0, data/split-client-1, ...): every party reads only its own.",
    )
    label_column: str = setting("label", "csv: the column holding the labels (every other column is a numeric feature).")
    classes: str | None = setting(None, "The class list, comma-separated, in label order (default: the classes the party's training data holds, sorted).", metavar="NAME,...")
    image_size: str | None = setting(None, "imagefolder: resize every image to H,W (default: every image must already have one size).", metavar="H,W", pattern=r"^\d+,\d+$")
    mean: str | None = setting(None, "Per-channel (or per-column) mean to normalise the party's own data with, comma-separated (default: its training data's).", metavar="M,...")
    std: str | None = setting(None, "Per-channel (or per-column) standard deviation, comma-separated (default: its training data's).", metavar="S,...")
    model: str = setting(
        "cnn", "cnn, tiny, or a torchvision classification model such as resnet18 (splitfed models lists them). cnn: two conv blocks and "
        "three dense layers; tiny: logistic regression, for scale tests.", metavar="MODEL",
    )
    batch_size: int = setting(64, "Training batch size.", min=1)
    eval_batch_size: int = setting(500, "Batch size for evaluation on the test set.", min=1)
    lr: float = setting(1e-3, "Learning rate.", min=0.0)
    optimizer: str = setting("adam", "Optimiser (each party runs its own over its own layers).", choices=OPTIMIZERS)
    seed: int = setting(1, "Seed for initialisation, batch order and partitions.")
    limit: int | None = setting(None, "Use only the first N training samples.", min=1)
    test_limit: int | None = setting(None, "Use only the first N test samples.", min=1)
    device: str = setting(
        "auto", "Where the party computes: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N. The model, its optimiser, "
        "each batch and the averaging live there; the data stays on the CPU and each batch moves as it is taken.", metavar="auto|cpu|cuda[:N]",
        pattern=DEVICE_PATTERN,
    )
    precision: str = setting(
        "fp32", "What training and evaluation compute in: fp32, or bf16 or fp16 under autocast (fp16 with a gradient scaler). "
        "Parameters and optimiser state stay fp32.", choices=PRECISIONS,
    )
    data_on_device: bool = setting(False, "Move the party's whole data set to the device once, rather than each batch as it is taken (when it fits).")

    def check_partition(self, parties: int) -> None:
        """A --partition that cannot share the built-in data set out among `parties` is refused
        now. A task or a party's own files may mean no sharing at all: learning.tasks decides
        once it has loaded the task (and refuses a --partition then)."""
        if self.task is None and self.dataset in DATASETS and not has_placeholders(self.data_dir):
            parse_partition(getattr(self, "partition"), parties, DATASETS[self.dataset].classes)


@dataclass(kw_only=True)
class TrainSettings(ModelSettings):
    """Training in epochs over one data set (centralized, split)."""

    epochs: int = setting(1, "Passes over the training data.", min=1)


@dataclass(kw_only=True)
class SplitSettings(TrainSettings):
    cut_layer: str | None = setting(
        None, "Where the model is cut: a layer index K (the client keeps the first K layers) or, for a torchvision model, the name of the "
        "layer to cut after, such as layer1 (splitfed models --cuts MODEL lists them). Default: cnn after its first dense layer, where the "
        "activation is smallest; a torchvision model before its classifier.", metavar="K|NAME",
    )
    mode: str = setting("vanilla", "vanilla: the server computes the loss; u-shaped: the client keeps the last layer and the labels.", choices=SPLIT_MODES)
    wire_dtype: str = setting(
        "fp32", "The dtype activations and gradients travel in between the split parties: bf16 or fp16 halve the bytes per batch "
        "(the parties compute in --precision either way). Client and server must agree.", choices=PRECISIONS,
    )

    # Defences (learning.defences): what the client does to what leaves it. The server needs none of them.
    nopeek_weight: float = setting(0.0, "NoPeek: the client adds this times the distance correlation between a batch's inputs and its cut "
                                        "activations to its loss, so that the activations say less of the inputs (0: off).", min=0.0, max=1000.0)
    activation_clip: float | None = setting(None, "Clip each sample's cut activation to this L2 norm before it leaves the client (training and "
                                                  "evaluation).", min=1e-6, metavar="C")
    activation_noise: float = setting(0.0, "With --activation-clip C: add Gaussian noise of standard deviation this times C to each clipped "
                                           "activation before it leaves the client (0: none).", min=0.0, max=1000.0, metavar="S")
    gradient_defence: str = setting("none", "u-shaped: what the client does to the gradients it returns to the server, which carry its labels: "
                                            "max-norm (noise that gives every sample the batch's largest expected norm) or noise (--gradient-noise).",
                                    choices=GRADIENT_DEFENCES)
    gradient_noise: float = setting(1.0, "--gradient-defence noise: the noise's standard deviation per element, as this times the batch's largest "
                                         "gradient norm over the square root of its size.", min=0.0, max=1000.0, metavar="S")
    label_dp: float | None = setting(None, "vanilla: label differential privacy, EPSILON-label-DP per sample: each training label leaves the client "
                                           "once, through randomised response (see --label-dp-prior), and the server never sees a true label with "
                                           "certainty.", min=1e-3, max=50.0, metavar="EPSILON")
    label_dp_prior: str = setting("none", "--label-dp: none (plain randomised response over all classes) or model (RR-with-prior, in two "
                                          "stages: after the first half of the labels, each is drawn among the classes the model ranks highest; "
                                          "one more round trip a batch then; more labels true at high EPSILON, and it can feed the model its own "
                                          "guesses at low EPSILON).", choices=LABEL_PRIORS)

    def __post_init__(self) -> None:
        if self.precision == "fp16":
            raise ValueError("--precision fp16 needs its loss scaled, and in split learning the loss and the layers it would scale are "
                             "on different parties: use --precision bf16 (the same range as fp32, no scaling)")
        if self.activation_noise and self.activation_clip is None:
            raise ValueError(f"--activation-noise {self.activation_noise} is a multiple of the clipping norm: give --activation-clip C too")
        if self.mode == "u-shaped" and self.label_dp is not None:
            raise ValueError("--label-dp is for vanilla mode: in u-shaped mode the labels never leave the client (use --gradient-defence "
                             "against the gradients that carry them)")
        if self.mode == "vanilla" and self.gradient_defence != "none":
            raise ValueError(f"--gradient-defence {self.gradient_defence} is for u-shaped mode: in vanilla mode the server computes the loss "
                             "and the client returns no gradients (use --label-dp to protect the labels)")


@dataclass(kw_only=True)
class SplitNNSettings(SplitSettings):
    """Split learning with several data owners (split clients) against one split server."""

    clients: int = setting(1, "Split clients, each holding one share of the training data.", min=1)
    schedule: str = setting(
        "splitfed-v2", "round-robin: clients train in turn, each from the previous one's layers; splitfed-v1: in parallel, one server half per "
        "client, both halves averaged each epoch; splitfed-v2: in parallel against one server half, client halves averaged each epoch.",
        choices=SCHEDULES,
    )
    partition: str = setting("iid", "How the training data is shared out among the clients: iid | classes:0-3,4-6,7-9 | dirichlet:ALPHA | shards:K.")
    syncs_per_epoch: int = setting(
        1, "splitfed-v1 and v2: how many times per epoch the client halves (and splitfed-v1's server halves) are averaged; each client's "
        "epoch is cut into this many runs of batches, each closed like an epoch. More often keeps the clients' layers closer together.",
        min=1,
    )
    fed_lr: float = setting(
        1.0, "splitfed-v1 and v2: how far each averaging moves the client halves (and splitfed-v1's server halves): from the last average "
        "(where every client began the period) by this times the change to the new one; the run's first averaging is the plain average. "
        "1: plain averaging; above 1 makes up for the clients' steps being averaged rather than added up (Reddi et al.'s server learning "
        "rate).", min=0.0,
    )
    evaluate: str = setting(
        "server", "Where the model is scored after each epoch: server (the clients score the server's test set, each its part), parties (each "
        "client scores the model on its own test data and the server adds up their counts: the split-server needs no data) or both.",
        choices=EVALUATIONS,
    )
    min_clients: int | None = setting(None, "Close an epoch with this many clients once a silent one has used up --client-timeout (default: all).", min=1)
    client_timeout: float = setting(60.0, "Seconds a client may stay silent before the server gives up on its share of the epoch (or its turn, in round-robin).", min=0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_partition(self.clients)
        if (self.syncs_per_epoch != 1 or self.fed_lr != 1.0) and self.schedule == "round-robin":
            raise ValueError("--syncs-per-epoch and --fed-lr are for splitfed-v1 and v2: round-robin clients hand their layers on, they are not averaged")
        if self.min_clients is not None and self.min_clients > self.clients:
            raise ValueError(f"--min-clients {self.min_clients} is more than the {self.clients} clients")

    def quorum(self) -> int:
        """Clients an epoch needs to close once the others have gone silent."""
        return self.min_clients or self.clients


@dataclass(kw_only=True)
class Holdout:
    holdout: int = setting(0, "Keep the last N training samples from the parties that train and score on them instead of the test set (to tune without the test set).", min=0)


@dataclass(kw_only=True)
class PeerSettings(Holdout, ModelSettings):
    """Decentralized training: --peers data owners, no server; what every peer shares."""

    peers: int = setting(4, "Peers the training data is shared out among (each holds one share; a peer's --peer-index says which).", min=1)
    partition: str = setting("iid", "How the training data is shared out among the peers: iid | classes:0-3,4-6,7-9 | dirichlet:ALPHA | shards:K.")
    syncs_per_epoch: int = setting(1, "Times per local epoch a peer synchronises (p2p: averages with the live peers; SMPL: closes a hyperedge): "
                                      "more often keeps label-skewed peers from drifting apart, at more traffic.", min=1)
    prox_mu: float = setting(0.0, "Drift correction: the proximal term mu/2 * ||w - w_last||^2 in the local loss keeps a peer near the model of its "
                                  "last synchronisation (0: off).", min=0.0)
    lc_tau: float = setting(0.0, "Drift correction: each peer subtracts lc_tau * n_c^(-1/4) from the logit of each class c it holds n_c samples of "
                                 "(n_c = 0 counts as 1) in its local loss, calibrating it by its own label counts (0: off).", min=0.0)

    def __post_init__(self) -> None:
        self.check_partition(self.peers)


@dataclass(kw_only=True)
class P2PSettings(PeerSettings):
    """P2P averaging: after each local epoch a peer sends its model to every live peer and averages what has arrived."""

    epochs: int = setting(3, "Local epochs each peer trains; it averages --syncs-per-epoch times in each.", min=1)
    max_staleness: int = setting(2, "Models more than this many synchronisations behind the receiving peer are dropped, not averaged.", min=0)
    staleness_discount: float = setting(0.5, "A model s synchronisations behind the receiving peer counts with weight samples * discount^s.", min=0.0, max=1.0)
    sync_wait: float = setting(0.0, "Seconds a peer waits at each synchronisation for the models of the run's other peers that it has not heard "
                                    "from yet (peers that left or were evicted are not waited for); 0: it never waits and averages what has arrived.", min=0.0)


LOCAL_PARALLEL = ("hogwild", "sgd")
HYPEREDGE_STARTS = ("source", "mean")


@dataclass(kw_only=True)
class HyperedgeSettings:
    """How the tracker forms SMPL's hyperedges (torch-free: the tracker trains nothing)."""

    seed: int = setting(1, "Seed for initialisation, batch order, partitions and the hyperedges' draws.")
    hyperedge_size: int = setting(2, "Peers in each hyperedge (u, uniform).", min=2)
    max_hyperedges: int = setting(1, "Hyperedges a peer may be in at the same time (regular).", min=1)
    variety: int = setting(1, "Members of a new hyperedge a peer must not already share an open hyperedge with.", min=1)
    epsilon: float = setting(1.0, "Chance that a hyperedge starts from its best member's model (lowest validation loss) rather than a random member's.", min=0.0, max=1.0)
    async_global: bool = setting(True, "Hyperedges form as soon as enough peers are free; off: in global rounds, each round's hyperedges formed together once every live peer asks.")

    def __post_init__(self) -> None:
        if self.variety > self.hyperedge_size - 1:
            raise ValueError(f"--variety {self.variety} needs hyperedges of at least {self.variety + 1} peers")


@dataclass(kw_only=True)
class SMPLSettings(PeerSettings, HyperedgeSettings):
    """SMPL (simultaneous multi-party learning): peers train in random hyperedges of --hyperedge-size and synchronise inside each."""

    hyperepochs: int = setting(3, "Local epochs each peer trains, in --syncs-per-epoch hyperedges each.", min=1)
    sparsity: float = setting(0.0, "Fraction of each parameter change not sent (top-k by magnitude; the rest stays with the peer).", min=0.0, max=0.999)
    local_parallel: str = setting("sgd", "hogwild: --local-workers threads update the peer's model without locks; sgd: one loop.", choices=LOCAL_PARALLEL)
    local_workers: int = setting(2, "Threads training the peer's model with --local-parallel hogwild.", min=1)
    async_mid: bool = setting(False, "Members apply each member's change as it arrives; off: they apply the hyperedge's mean once every member's is in.")
    async_local: bool = setting(True, "A peer keeps training while it waits for its hyperedges' changes; off: it waits idle.")
    hyperedge_timeout: float = setting(60.0, "Seconds a hyperedge waits for a member before closing without it.", min=0.1)
    start: str = setting("source", "What a hyperedge's members start from: source, one member's model (--epsilon picks whose); mean, the members' "
                                   "sample-weighted mean (every member sends its model: under label skew no member's training is thrown away).",
                         choices=HYPEREDGE_STARTS)

    def __post_init__(self) -> None:
        PeerSettings.__post_init__(self)
        HyperedgeSettings.__post_init__(self)
        if self.hyperedge_size > self.peers:
            raise ValueError(f"--hyperedge-size {self.hyperedge_size} is more than the {self.peers} peers")


SECURE_AGGREGATIONS = ("none", "secagg+")  # learning.secagg
DP_MODES = ("none", "central", "local", "sample")  # learning.privacy


@dataclass(kw_only=True)
class PrivacySettings:
    """What a federated worker's update may reveal: secure aggregation (the server learns only the
    round's sum) and differential privacy (the sum, or each update, says little of any one worker
    or sample). Worker and server must agree on them: the server's model messages state them and a
    worker refuses a round that does not."""

    secure_aggregation: str = setting(
        "none", "secagg+: the server learns only the round's sample-weighted sum of the workers' model changes and their total samples "
        "(SecAgg+: pairwise masks over a random k-regular graph of the round's workers, recoverable from t neighbours' Shamir shares). "
        "Only rules that need the sum alone: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, fedlc, fedrs, fedbabu.",
        choices=SECURE_AGGREGATIONS,
    )
    secagg_neighbours: int | None = setting(
        None, "secagg+: each worker's neighbours k in the masking graph, even (default: the smallest even number >= 3 log2 n for n workers a "
        "round, at most n - 1; n - 1 is every pair, as the original SecAgg).", min=2, max=254, metavar="K",
    )
    secagg_threshold: int | None = setting(
        None, "secagg+: shares t of its k neighbours needed to unmask a worker; above k/2, so a server cannot gather both a worker's self-mask "
        "and its key (default: k/2 + 1).", min=1, metavar="T",
    )
    secagg_clip: float = setting(
        1.0, "secagg+: each coordinate of a worker's model change is clipped to [-C, C] before it is quantised into the field Z_2^32 (the "
        "quantisation step is C n / 2^31 for n workers a round).", min=1e-6, metavar="C",
    )
    secagg_max_samples: int = setting(
        65536, "secagg+: the most samples one worker may hold; updates are weighted by samples over this inside the masked sum, so a larger "
        "value coarsens the quantisation (a worker with more refuses to start).", min=1,
    )
    dp: str = setting(
        "none", "Differential privacy for the workers: central (workers clip their model change to --dp-clip, the server adds Gaussian noise "
        "to the sum), local (each worker adds the noise to its own clipped change), sample (DP-SGD on each worker through Opacus: each "
        "sample's gradient clipped and noised). With central or local every worker weighs the same in the mean.", choices=DP_MODES,
    )
    dp_clip: float = setting(1.0, "--dp: the L2 norm C a worker's model change (central, local) or a sample's gradient (sample) is clipped to.", min=1e-6, metavar="C")
    dp_noise_multiplier: float = setting(1.0, "--dp: the Gaussian noise's standard deviation as a multiple z of the clip.", min=0.0, metavar="Z")
    dp_delta: float = setting(1e-5, "--dp: the delta epsilon is reported at.", min=1e-12, max=0.5)
    dp_target_epsilon: float | None = setting(None, "--dp: end the run before a round that would take epsilon past this.", min=1e-6, metavar="EPSILON")
    dp_adaptive_clip: bool = setting(False, "--dp central: adapt the clip each round towards --dp-target-quantile of the update norms, "
                                            "from a noised count of the workers under it (Andrew et al. 2021).")
    dp_target_quantile: float = setting(0.5, "--dp-adaptive-clip: the fraction of updates that should fall under the clip.", min=0.0, max=1.0)
    dp_clip_lr: float = setting(0.2, "--dp-adaptive-clip: the clip's geometric learning rate.", min=0.0)
    dp_clip_count_stddev: float | None = setting(None, "--dp-adaptive-clip: the noise on the count of updates under the clip (default: "
                                                       "workers a round / 20).", min=0.0)

    def __post_init__(self) -> None:
        if self.dp == "sample" and getattr(self, "precision", "fp32") == "fp16":
            raise ValueError("--dp sample clips each sample's gradient, and fp16's loss scaling would have it clip scaled ones: use --precision bf16 or fp32")
        if self.dp_adaptive_clip and self.dp != "central":
            raise ValueError(f"--dp-adaptive-clip adapts the clip from the workers' noised count at the server: it is for --dp central, not {self.dp}")
        if self.dp_target_epsilon is not None and self.dp == "none":
            raise ValueError("--dp-target-epsilon needs --dp central, local or sample")


@dataclass(kw_only=True)
class PartitionSettings(Holdout, PrivacySettings, ModelSettings):
    """What a federated worker needs: which share of the data is its own, and its local work."""

    workers: int = setting(3, "Number of workers (each holds one share of the training data).", min=1)
    partition: str = setting("classes:0-3,4-6,7-9", "How the training data is shared out: classes:0-3,4-6,7-9 | iid | dirichlet:ALPHA | shards:K.")
    local_epochs: int = setting(1, "Local epochs per round on each worker.", min=1)
    local_steps: int | None = setting(None, "Local optimiser steps per round instead of --local-epochs.", min=1)
    lr_decay: float = setting(1.0, "Workers' learning rate in round r is lr * lr_decay^(r-1).", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        PrivacySettings.__post_init__(self)
        self.check_partition(self.workers)


def split_client_name(index: int, clients: int) -> str:
    """A split client's party name: `split-client` alone (as in a two-party run), `split-client-I` among several."""
    return "split-client" if clients == 1 else f"split-client-{index}"


def worker_ids(count: int) -> list[str]:
    """The workers' names in a run of `count` (the plain loop and the sampler use them too)."""
    return [f"worker-{index}" for index in range(count)]


@dataclass(kw_only=True)
class FederatedSettings(PartitionSettings):
    """The whole federation: rounds and the aggregation rule on top of the workers' settings."""

    rounds: int = setting(10, "Federated rounds.", min=1)
    clients_per_round: int | None = setting(None, "Workers drawn (seeded) to train in each round; the others wait (default: every worker).", min=1)
    fraction: float | None = setting(None, "Fraction of the workers drawn to train in each round, at least one (instead of --clients-per-round).", min=0.0, max=1.0)
    strategy: str = setting(
        "fedavg", "Aggregation: fedavg, fedprox; median, trimmed-mean, krum (resist poisoned updates); server optimisers fedavgm, "
        "fedadam, fedyogi, fedadagrad; scaffold (drift correction); fedrs (restricted softmax), fedbabu (fixed head) and fedlc (calibrated logits, server momentum), for label skew.", choices=STRATEGIES,
    )
    prox_mu: float = setting(0.01, "FedProx proximal weight (with --strategy fedprox).", min=0.0)
    trim: float = setting(0.2, "Fraction trimmed at each end by trimmed-mean.", min=0.0, max=0.49)
    byzantine: int = setting(1, "Poisoned workers krum tolerates.", min=0)
    rule: str = setting("mean", "How server optimisers combine the round's models before their step (a robust rule resists poisoning).", choices=RULES)
    server_lr: float | None = setting(None, "Server learning rate of fedavgm, fedlc, fedadam, fedyogi, fedadagrad, scaffold (default: 1 for fedavgm, fedlc and scaffold, 0.01 for the adaptive ones).", min=0.0)
    server_momentum: float = setting(0.9, "Server momentum of fedavgm and fedlc.", min=0.0, max=1.0)
    beta1: float = setting(0.9, "First-moment decay of fedadam, fedyogi, fedadagrad.", min=0.0, max=1.0)
    beta2: float = setting(0.99, "Second-moment decay of fedadam and fedyogi.", min=0.0, max=1.0)
    tau: float = setting(1e-3, "Adaptivity (epsilon) of fedadam, fedyogi, fedadagrad.", min=1e-12)
    lc_tau: float = setting(1.0, "fedlc: workers subtract lc_tau * n_c^(-1/4) from the logit of each class c they hold n_c samples of (n_c = 0 counts as 1) in their local loss.", min=0.0)
    rs_alpha: float = setting(0.5, "fedrs: how much the logits of classes a worker holds no sample of count in its local loss.", min=0.0, max=1.0)
    evaluate: str = setting(
        "server", "Where the global model is scored after each round: server (on its test set), parties (each worker scores it on its own "
        "test data and sends its counts; the server adds them up and needs no data at all) or both.", choices=EVALUATIONS,
    )
    calibration: str = setting(
        "none", "After the last round: ccvr retrains the last layer on features drawn from per-class Gaussians that the workers' feature "
        "statistics give (CCVR; the workers send each class's count, mean and covariance of penultimate features, no samples).", choices=CALIBRATIONS,
    )
    calibration_samples: int = setting(2000, "ccvr: virtual features drawn per class.", min=1)
    calibration_epochs: int = setting(10, "ccvr: epochs over the virtual features.", min=1)
    calibration_lr: float = setting(0.01, "ccvr: learning rate of the last layer's retraining (SGD, momentum 0.9).", min=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give --clients-per-round or --fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round > self.workers:
            raise ValueError(f"--clients-per-round {self.clients_per_round} is more than the {self.workers} workers")
        if self.fraction == 0:
            raise ValueError("--fraction must be above 0")
        if self.secure_aggregation != "none":
            if problem := self.needs_individual_updates():
                raise ValueError(f"--secure-aggregation {self.secure_aggregation} shows the server only the round's sum, but {problem}")
            self.secagg_graph(self.round_sample_size(self.workers))
            if (total := self.round_sample_size(self.workers) * self.secagg_max_samples) >= 2**32:
                raise ValueError(f"--secagg-max-samples {self.secagg_max_samples} for {self.round_sample_size(self.workers)} workers a round: their "
                                 f"samples, up to {total}, would not fit the field's 2^32")
        if self.dp == "central" and (problem := self.needs_individual_updates(secure=False)):
            raise ValueError(f"--dp central calibrates its noise to the sum of clipped updates, but {problem}")
        if self.dp != "none" and (self.strategy == "scaffold" or self.calibration == "ccvr"):
            sent = "its control variate's change" if self.strategy == "scaffold" else "its feature statistics"
            raise ValueError(f"--dp {self.dp} noises what the workers' model changes reveal, but with "
                             f"{'--strategy scaffold' if self.strategy == 'scaffold' else '--calibration ccvr'} each worker also sends {sent}, un-noised")
        if self.dp == "sample" and self.strategy == "fedprox":
            raise ValueError("--dp sample clips and noises the gradients Opacus sees per sample, and fedprox's proximal term is not one of them")
        if self.dp_adaptive_clip:
            count_stddev = self.dp_clip_count_stddev if self.dp_clip_count_stddev is not None else self.round_sample_size(self.workers) / 20
            if 0 < self.dp_noise_multiplier >= 2 * count_stddev:
                raise ValueError(f"--dp-adaptive-clip: the noise on the count of updates under the clip ({count_stddev:g}) must be above half "
                                 f"--dp-noise-multiplier {self.dp_noise_multiplier:g}, or the count alone would spend the budget: raise "
                                 "--dp-clip-count-stddev (more workers a round raise its default, n / 20)")

    def needs_individual_updates(self, secure: bool = True) -> str | None:
        """What in these settings needs each worker's own update, not only the sum (`secure`: also
        the per-worker values secure aggregation hides); None if nothing does."""
        if self.strategy in ("median", "trimmed-mean", "krum"):
            return f"--strategy {self.strategy} needs each worker's update"
        if self.strategy in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedlc") and self.rule != "mean":
            return f"--rule {self.rule} needs each worker's update"
        if secure and self.strategy == "scaffold":
            return "--strategy scaffold needs each worker's control variate"
        if secure and self.calibration == "ccvr":
            return "--calibration ccvr needs each worker's feature statistics"
        return None

    def secagg_graph(self, workers: int, fitted: bool = False) -> tuple[int, int]:
        """SecAgg+'s neighbours k and threshold t for a round of `workers`; ValueError for a k or t
        that cannot work. By default k is the smallest even number >= 3 log2 n (Bell et al. 2020:
        a logarithmic degree keeps the graph connected after dropouts with high probability), or
        every other worker when that is fewer; t = k/2 + 1 is the least majority. `fitted`: a round
        smaller than the run was checked for (workers given up on) takes the largest k and t that
        fit it, t still above k/2."""
        if workers < 2:
            raise ValueError("--secure-aggregation needs at least 2 workers a round: the sum of one is its update")
        k = self.secagg_neighbours
        if fitted and k is not None and k > workers - 1:
            k = workers - 1
        if fitted and k is not None and k % 2 and k != workers - 1:
            k -= 1
        if k is None:
            k = min(workers - 1, 2 * math.ceil(1.5 * math.log2(workers)))
        elif k > workers - 1:
            raise ValueError(f"--secagg-neighbours {k} is more than the {workers - 1} other workers of a round")
        elif k % 2 and k != workers - 1:
            raise ValueError(f"--secagg-neighbours {k} must be even (k/2 on each side in the ring), or every other worker ({workers - 1})")
        t = self.secagg_threshold if self.secagg_threshold is not None else k // 2 + 1
        if fitted:
            t = max(min(t, k), k // 2 + 1)
        if not k / 2 < t <= k:
            raise ValueError(f"--secagg-threshold {t} must be above k/2 = {k / 2:g} (so no server gets both a worker's self-mask and its "
                             f"key) and at most k = {k}")
        return k, t

    def samples_clients(self) -> bool:
        """Whether rounds draw some of the workers rather than take every one."""
        return self.clients_per_round is not None or self.fraction is not None

    def round_sample_size(self, registered: int) -> int:
        """How many of `registered` workers a round draws: all of them without sampling."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, registered)
        if self.fraction is not None:
            return max(1, math.ceil(self.fraction * registered))
        return registered
