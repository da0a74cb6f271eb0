"""The splitfed command line: `run` a whole scenario, `serve` one role. Thin: parse, call, print."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitfed.learning.settings import DATASETS

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
run_app = typer.Typer(help="Run a whole scenario and write its results.", no_args_is_help=True)
serve_app = typer.Typer(help="Run one long-lived service (the entrypoint of every image). Every option can also come from SPLITFED_<OPTION>.", no_args_is_help=True)
keys_app = typer.Typer(help="Party identities: ed25519 key pairs and the key-list file servers trust.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(serve_app, name="serve")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)
log = logging.getLogger("splitfed")

Dataset = Enum("Dataset", {name.replace("-", "_"): name for name in DATASETS}, type=str)


Model = Enum("Model", {name: name for name in ("cnn", "tiny")}, type=str)


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


class SplitMode(str, Enum):
    vanilla = "vanilla"
    u_shaped = "u-shaped"


class Strategy(str, Enum):
    fedavg = "fedavg"
    fedprox = "fedprox"
    median = "median"
    trimmed_mean = "trimmed-mean"
    krum = "krum"


class Via(str, Enum):
    relay = "relay"
    direct = "direct"


def _env(name: str) -> str:
    return "SPLITFED_" + name.upper().replace("-", "_")


def opt(name: str, help: str, **kwargs):  # noqa: A002 (typer's word)
    return typer.Option(f"--{name}", envvar=_env(name), help=help, **kwargs)


# Options shared by `run` and `serve` commands (one definition each).
DatasetOpt = Annotated[Dataset, opt("dataset", "Data set.")]
ModelOpt = Annotated[Model, opt("model", "cnn: two conv blocks and three dense layers; tiny: logistic regression, for scale tests.")]
DataDirOpt = Annotated[Optional[Path], opt("data-dir", "Folder with IDX files (MNIST, or Fashion-MNIST outside Debian's package).")]
EpochsOpt = Annotated[int, opt("epochs", "Passes over the training data.", min=1)]
BatchOpt = Annotated[int, opt("batch-size", "Training batch size.", min=1)]
LrOpt = Annotated[float, opt("lr", "Learning rate.", min=0.0)]
OptimizerOpt = Annotated[Optimizer, opt("optimizer", "Optimiser (each party runs its own over its own layers).")]
SeedOpt = Annotated[int, opt("seed", "Seed for initialisation and batch order.")]
LimitOpt = Annotated[Optional[int], opt("limit", "Use only the first N training samples.", min=1)]
TestLimitOpt = Annotated[Optional[int], opt("test-limit", "Use only the first N test samples.", min=1)]
CutOpt = Annotated[Optional[int], opt("cut-layer", "Layer index where the model is cut (default: after the conv blocks).", min=1)]
ModeOpt = Annotated[SplitMode, opt("mode", "vanilla: the server computes the loss; u-shaped: the client keeps the last layer and the labels.")]
ViaOpt = Annotated[Via, opt("via", "Through the relay service, or straight between the halves' queues.")]
SessionOpt = Annotated[str, opt("session", "Session id: names the queues, so runs never see each other's messages.")]
TimeoutOpt = Annotated[float, opt("timeout", "Seconds to wait for a peer before giving up.", min=0.1)]
OutOpt = Annotated[Optional[Path], opt("out", "Write the results as JSON here.")]
BrokerOpt = Annotated[str, opt("broker", "memory (one process) or amqp(s)://user:pass@host:port/vhost.")]
ChunkOpt = Annotated[int, opt("chunk-size", "Frames larger than this many bytes travel in chunks.", min=1024)]
HeartbeatOpt = Annotated[Optional[int], opt("heartbeat", "AMQP heartbeat in seconds (broker default if unset).", min=0)]
TlsCaOpt = Annotated[Optional[Path], opt("tls-ca", "CA file to verify the broker (amqps://).")]
TlsCertOpt = Annotated[Optional[Path], opt("tls-cert", "Client certificate for the broker (amqps://).")]
TlsKeyOpt = Annotated[Optional[Path], opt("tls-key", "Client key for the broker (amqps://).")]
MetricsPortOpt = Annotated[int, opt("metrics-port", "Serve Prometheus metrics on this port (0: off).", min=0, max=65535)]
LogLevelOpt = Annotated[str, opt("log-level", "Logging level.")]
WorkersOpt = Annotated[int, opt("workers", "Number of workers.", min=1)]
PartitionOpt = Annotated[str, opt("partition", "How the training data is shared out: classes:0-3,4-6,7-9 | iid | dirichlet:ALPHA | shards:K.")]
RoundsOpt = Annotated[int, opt("rounds", "Federated rounds.", min=1)]
LocalEpochsOpt = Annotated[int, opt("local-epochs", "Local epochs per round on each worker.", min=1)]
StrategyOpt = Annotated[Strategy, opt("strategy", "Aggregation rule (median, trimmed-mean and krum resist poisoned updates).")]
ProxMuOpt = Annotated[float, opt("prox-mu", "FedProx proximal weight (with --strategy fedprox).", min=0.0)]
TrimOpt = Annotated[float, opt("trim", "Fraction trimmed at each end by trimmed-mean.", min=0.0, max=0.49)]
ByzantineOpt = Annotated[int, opt("byzantine", "Poisoned workers krum tolerates.", min=0)]
MinWorkersOpt = Annotated[Optional[int], opt("min-workers", "Close a round with this many updates once --round-timeout passes (default: all).", min=1)]
RoundTimeoutOpt = Annotated[float, opt("round-timeout", "Seconds a round waits for every worker before closing with --min-workers.", min=0.1)]
KeyListOpt = Annotated[Optional[Path], opt("key-list", "Key-list file of trusted parties (none: unsafe mode).")]
PrivateKeyOpt = Annotated[Optional[Path], opt("private-key", "This party's private key (PEM) to sign what it sends.")]
CheckpointOpt = Annotated[Optional[Path], opt("checkpoint-dir", "Where the server keeps its checkpoint; a restart resumes from it.")]
ThreadsOpt = Annotated[Optional[int], opt("torch-threads", "Torch threads in this process.", min=1)]


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _write_results(result: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"splitfed {result['scenario']}")
    for column in ("step", "test accuracy", "test loss", "train loss", "seconds"):
        table.add_column(column, justify="right")
    for record in result["history"]:
        table.add_row(str(record["step"]), f"{record['accuracy']:.4f}", f"{record['loss']:.4f}", f"{record['train_loss']:.4f}", f"{record['seconds']:.1f}")
    Console(stderr=True).print(table)
    err.print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  wall {result['wall_seconds']:.1f}s  "
              f"traffic {result['traffic']['messages']} messages / {result['traffic']['bytes'] / 1e6:.1f} MB"
              + (f"  results in {out}" if out else ""), highlight=False)


def _transport_options(chunk_size: int, heartbeat: int | None, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> dict:
    """Broker options in the flat form that also travels to child processes as SPLITFED_*."""
    return {"chunk_size": chunk_size, "heartbeat": heartbeat, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}


def _guard(fn):
    """Turn expected failures into a message on stderr and a non-zero exit code."""
    from splitfed.learning.data import DataError
    from splitfed.roles.endpoint import RoleTimeout
    from splitfed.roles.fedavg_worker import Refused
    from splitfed.scenarios.launch import ScenarioError
    from splitfed.transport import TransportError

    try:
        return fn()
    except (DataError, ValueError) as exc:
        raise _fail(str(exc), 2) from None
    except RoleTimeout as exc:
        raise _fail(str(exc), 3) from None
    except Refused as exc:
        raise _fail(str(exc), 5) from None
    except (TransportError, ScenarioError) as exc:
        raise _fail(str(exc), 4) from None


# -- run ------------------------------------------------------------------------------------


@run_app.command("centralized")
def run_centralized(
    dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, epochs: EpochsOpt = 1, batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
    test_limit: TestLimitOpt = None, out: OutOpt = None,
    save_model: Annotated[Optional[Path], typer.Option(help="Write the trained model (safetensors).")] = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """The reference's "normal" mode: the whole model in one process (the baseline)."""
    from splitfed.learning.settings import TrainSettings
    from splitfed.scenarios import centralized
    from splitfed.scenarios.progress import Reporter

    _logging(log_level)
    settings = TrainSettings(dataset.value, data_dir, model.value, epochs, batch_size, 500, lr, optimizer.value, seed, limit, test_limit)
    with Reporter("centralized", epochs) as reporter:
        result = _guard(lambda: centralized.run(settings, reporter, save_model))
    _write_results(result, out)


@run_app.command("split")
def run_split(
    dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, epochs: EpochsOpt = 1, batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
    test_limit: TestLimitOpt = None, cut_layer: CutOpt = None, mode: ModeOpt = SplitMode.vanilla, via: ViaOpt = Via.relay,
    broker: BrokerOpt = "memory", session: Annotated[Optional[str], opt("session", "Session id (default: a new random one).")] = None,
    timeout: TimeoutOpt = 300.0, chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None, out: OutOpt = None,
    save_model: Annotated[Optional[Path], typer.Option(help="Write the trained model, both halves merged (safetensors).")] = None,
    key_list: Annotated[Optional[Path], opt("key-list", "Key-list file; the halves sign with PARTY.key from its folder (splitfed keys generate --party split-client --party split-server).")] = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Split learning: client (data, labels, first layers) and server (the rest), in one process
    (--broker memory) or as separate relay / split-client / split-server processes over RabbitMQ."""
    from splitfed.roles.split_common import SplitSettings
    from splitfed.scenarios import split
    from splitfed.scenarios.launch import new_session
    from splitfed.scenarios.progress import Reporter

    _logging(log_level)
    settings = SplitSettings(
        dataset.value, data_dir, model.value, epochs, batch_size, 500, lr, optimizer.value, seed, limit, test_limit,
        session=session or new_session(), cut_layer=cut_layer, mode=mode.value, via=via.value, timeout=timeout,
    )
    options = _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key) if broker != "memory" else {}
    with Reporter(f"split ({mode.value}, {via.value}, {broker.split('://')[0]})", epochs) as reporter:
        result = _guard(lambda: split.run(settings, broker, reporter, save_model, transport_options=options, key_list=key_list))
    _write_results(result, out)


@run_app.command("fedavg")
def run_fedavg(
    dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
    test_limit: TestLimitOpt = None, workers: WorkersOpt = 3, partition: PartitionOpt = "classes:0-3,4-6,7-9",
    rounds: RoundsOpt = 10, local_epochs: LocalEpochsOpt = 1, strategy: StrategyOpt = Strategy.fedavg, prox_mu: ProxMuOpt = 0.01,
    trim: TrimOpt = 0.2, byzantine: ByzantineOpt = 1, min_workers: MinWorkersOpt = None, round_timeout: RoundTimeoutOpt = 120.0,
    key_list: Annotated[Optional[Path], opt("key-list", "Key-list file; every party signs with PARTY.key from its folder (splitfed keys generate).")] = None,
    checkpoint_dir: CheckpointOpt = None, broker: BrokerOpt = "memory",
    session: Annotated[Optional[str], opt("session", "Session id (default: a new random one).")] = None, timeout: TimeoutOpt = 600.0,
    chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None, out: OutOpt = None, log_level: LogLevelOpt = "info",
) -> None:
    """Federated averaging: a server and N workers that each hold only their share of the data
    (in one process with --broker memory, or every party its own process over RabbitMQ)."""
    from splitfed.roles.fedavg_common import FedAvgSettings
    from splitfed.scenarios import fedavg
    from splitfed.scenarios.progress import Reporter
    from splitfed.scenarios.launch import new_session

    _logging(log_level)
    settings = FedAvgSettings(
        dataset.value, data_dir, model.value, 1, batch_size, 500, lr, optimizer.value, seed, limit, test_limit,
        session=session or new_session(), workers=workers, partition=partition, rounds=rounds, local_epochs=local_epochs,
        strategy=strategy.value, prox_mu=prox_mu, trim=trim, byzantine=byzantine, min_workers=min_workers,
        round_timeout=round_timeout, timeout=timeout,
    )
    options = _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key) if broker != "memory" else {}
    with Reporter(f"fedavg ({strategy.value}, {workers} workers)", 1) as reporter:
        result = _guard(lambda: fedavg.run(settings, broker, reporter, key_list=key_list, checkpoint_dir=checkpoint_dir, transport_options=options))
    _write_results(result, out)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Folder for PARTY.key (private), PARTY.pub and key-list.json.")],
    workers: Annotated[int, typer.Option(help="Worker key pairs to make: worker-0 ... worker-(N-1).", min=0)] = 0,
    party: Annotated[Optional[list[str]], typer.Option(help="Other party names (repeatable).")] = None,
    server: Annotated[bool, typer.Option(help="Also make the fedavg-server key pair.")] = True,
) -> None:
    """Generate ed25519 key pairs and the key-list file that servers trust."""
    from splitfed.scenarios.fedavg import worker_ids
    from splitfed.security import keys

    names = (["fedavg-server"] if server else []) + worker_ids(workers) + list(party or [])
    if not names:
        raise _fail("nothing to generate: give --workers N or --party NAME", 2)
    key_list = keys.generate(out, names)
    err.print(f"wrote {len(names)} key pairs and {key_list}", highlight=False)


# -- serve ----------------------------------------------------------------------------------


def _identity(role: str, key_list: Path | None, private_key: Path | None) -> dict:
    from splitfed.security.keys import KeyList, load_private

    return {
        "signer": load_private(private_key, role) if private_key else None,
        "trusted": KeyList.load(key_list) if key_list else None,
    }


def _emitter(enabled: bool):
    """Progress events as JSON lines on stdout, for an orchestrating `splitfed run`."""
    if not enabled:
        return None
    return lambda event: print(json.dumps(event), flush=True)


def _serve(role: str, log_level: str, metrics_port: int, torch_threads: int | None, broker: str, transport_options: dict, work, **transport_extra) -> None:
    """settings → logging → metrics server → transport → role loop → exit code."""
    from splitfed.observability import metrics
    from splitfed.security.keys import KeyFileError
    from splitfed.transport import is_amqp

    _logging(log_level)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    if not is_amqp(broker):
        raise _fail(f"serve {role} needs --broker amqp://... or amqps://... (got {broker!r})", 2)
    metrics.serve(metrics_port)

    def connect_and_run():
        from splitfed.transport.rabbitmq import RabbitTransport

        with RabbitTransport.from_options(broker, role, transport_options, **transport_extra) as transport:
            return work(transport)

    try:
        _guard(connect_and_run)
    except KeyFileError as exc:
        raise _fail(str(exc), 2) from None


@serve_app.command("relay")
def serve_relay(
    session: SessionOpt, broker: BrokerOpt = "amqp://guest:guest@127.0.0.1:5672/", timeout: TimeoutOpt = 300.0,
    chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None, key_list: KeyListOpt = None, metrics_port: MetricsPortOpt = 0, log_level: LogLevelOpt = "info",
) -> None:
    """Forward frames between the two halves of one split session (no torch)."""
    from splitfed.roles.relay import Relay

    _serve("relay", log_level, metrics_port, None, broker, _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key),
           lambda transport: Relay(session, transport, timeout, _identity("relay", key_list, None)["trusted"]).run())


def _split_role(role: str):
    def command(
        session: SessionOpt, broker: BrokerOpt = "amqp://guest:guest@127.0.0.1:5672/",
        dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, epochs: EpochsOpt = 1, batch_size: BatchOpt = 64,
        lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
        test_limit: TestLimitOpt = None, cut_layer: CutOpt = None, mode: ModeOpt = SplitMode.vanilla, via: ViaOpt = Via.relay,
        timeout: TimeoutOpt = 300.0, chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None,
        tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
        save: Annotated[Optional[Path], opt("save", "Write this party's layers here at the end (safetensors).")] = None,
        key_list: KeyListOpt = None, private_key: PrivateKeyOpt = None, out: OutOpt = None,
        progress_events: Annotated[bool, opt("progress-events", "Print batch and epoch events as JSON lines on stdout.")] = False,
        metrics_port: MetricsPortOpt = 0, torch_threads: ThreadsOpt = None, log_level: LogLevelOpt = "info",
    ) -> None:
        from splitfed.roles.split_client import SplitClient
        from splitfed.roles.split_common import SplitSettings
        from splitfed.roles.split_server import SplitServer

        settings = SplitSettings(
            dataset.value, data_dir, model.value, epochs, batch_size, 500, lr, optimizer.value, seed, limit, test_limit,
            session=session, cut_layer=cut_layer, mode=mode.value, via=via.value, timeout=timeout,
        )

        emit = _emitter(progress_events)

        def work(transport):
            parties = _identity(role, key_list, private_key)
            if role == "split-server":
                return SplitServer(settings, transport, save, **parties).run()
            client = SplitClient(settings, transport, save, **parties)
            result = client.run(
                (lambda done, total, loss: emit({"event": "batch", "done": done, "total": total, "loss": loss})) if emit else None,
                (lambda record: emit({"event": "epoch", "record": vars(record)})) if emit else None,
            )
            if out:
                out.write_text(json.dumps(result))
            return result

        _serve(role, log_level, metrics_port, torch_threads, broker, _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key), work)

    return command


serve_app.command("split-client", help="The data owner of a split session: data, labels, first layers; drives training.")(_split_role("split-client"))
serve_app.command("split-server", help="The server half of a split session: the remaining layers, no data.")(_split_role("split-server"))


@serve_app.command("fedavg-server")
def serve_fedavg_server(
    session: SessionOpt, broker: BrokerOpt = "amqp://guest:guest@127.0.0.1:5672/",
    dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
    test_limit: TestLimitOpt = None, workers: WorkersOpt = 3, partition: PartitionOpt = "classes:0-3,4-6,7-9",
    rounds: RoundsOpt = 10, local_epochs: LocalEpochsOpt = 1, strategy: StrategyOpt = Strategy.fedavg, prox_mu: ProxMuOpt = 0.01,
    trim: TrimOpt = 0.2, byzantine: ByzantineOpt = 1, min_workers: MinWorkersOpt = None, round_timeout: RoundTimeoutOpt = 120.0,
    key_list: KeyListOpt = None, private_key: PrivateKeyOpt = None, checkpoint_dir: CheckpointOpt = None, timeout: TimeoutOpt = 600.0,
    chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None, out: OutOpt = None,
    progress_events: Annotated[bool, opt("progress-events", "Print round events as JSON lines on stdout.")] = False,
    metrics_port: MetricsPortOpt = 0, torch_threads: ThreadsOpt = None, log_level: LogLevelOpt = "info",
) -> None:
    """The FedAvg server: rounds, signed-update checks, aggregation, test accuracy, checkpoints."""
    from splitfed.roles.fedavg_common import SERVER, FedAvgSettings
    from splitfed.roles.fedavg_server import FedAvgServer

    settings = FedAvgSettings(
        dataset.value, data_dir, model.value, 1, batch_size, 500, lr, optimizer.value, seed, limit, test_limit,
        session=session, workers=workers, partition=partition, rounds=rounds, local_epochs=local_epochs, strategy=strategy.value,
        prox_mu=prox_mu, trim=trim, byzantine=byzantine, min_workers=min_workers, round_timeout=round_timeout, timeout=timeout,
    )
    emit = _emitter(progress_events)

    def work(transport):
        server = FedAvgServer(
            settings, transport, checkpoint_dir=checkpoint_dir, on_round=(lambda record: emit({"event": "round", "record": vars(record)})) if emit else None,
            **_identity(SERVER, key_list, private_key),
        )
        result = server.run()
        if out:
            out.write_text(json.dumps(result))

    # Every update of a round stays unacked until the round is on disk: let them all in.
    options = _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key)
    _serve(SERVER, log_level, metrics_port, torch_threads, broker, options, work, prefetch=2 * workers + 16)


@serve_app.command("fedavg-worker")
def serve_fedavg_worker(
    session: SessionOpt, worker_id: Annotated[str, opt("worker-id", "This worker's name (as in the key list).")],
    index: Annotated[int, opt("index", "Which share of the partition this worker holds (0-based).", min=0)],
    broker: BrokerOpt = "amqp://guest:guest@127.0.0.1:5672/",
    dataset: DatasetOpt = Dataset.fashion_mnist, model: ModelOpt = Model.cnn, data_dir: DataDirOpt = None, batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3, optimizer: OptimizerOpt = Optimizer.adam, seed: SeedOpt = 1, limit: LimitOpt = None,
    workers: WorkersOpt = 3, partition: PartitionOpt = "classes:0-3,4-6,7-9", local_epochs: LocalEpochsOpt = 1,
    key_list: KeyListOpt = None, private_key: PrivateKeyOpt = None, timeout: TimeoutOpt = 600.0,
    chunk_size: ChunkOpt = 16 * 1024**2, heartbeat: HeartbeatOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None, metrics_port: MetricsPortOpt = 0, torch_threads: ThreadsOpt = None, log_level: LogLevelOpt = "info",
) -> None:
    """A FedAvg worker: trains the global model on its own share and sends signed updates."""
    from splitfed.roles.fedavg_common import FedAvgSettings
    from splitfed.roles.fedavg_worker import FedAvgWorker

    if index >= workers:
        raise _fail(f"--index {index} is not below --workers {workers}", 2)
    settings = FedAvgSettings(
        dataset.value, data_dir, model.value, 1, batch_size, 500, lr, optimizer.value, seed, limit, None,
        session=session, workers=workers, partition=partition, local_epochs=local_epochs, timeout=timeout,
    )
    options = _transport_options(chunk_size, heartbeat, tls_ca, tls_cert, tls_key)
    _serve(worker_id, log_level, metrics_port, torch_threads, broker, options,
           lambda transport: FedAvgWorker(settings, transport, worker_id, index, **_identity(worker_id, key_list, private_key)).run())


def main() -> None:
    app(prog_name="splitfed")


if __name__ == "__main__":
    main()
