"""FedAvg benchmarks, ratios measured in one run.

    .venv/bin/python ci/bench_fedavg.py overhead [--limit 12000] [--rounds 3]
        Seconds per round: 3 workers as separate processes over RabbitMQ against the plain
        single-process loop doing the same training and averaging (learning.federated).
        Goal: ratio <= 1.05.
    .venv/bin/python ci/bench_fedavg.py scale [--workers 25 50 100 200] [--broker URL | --own-broker] [--profile DIR]
        The tiny model on digits; workers share a few processes, each worker with its own
        connection (or, with --shared-connection, one per process), key and signed updates; one
        server. Goal: >= 100 workers with rounds < 10 s; all-participating rounds at 1000 workers
        <= 4 s. The machine's broker allows only ~832 sockets: for 500+ workers use
        `--own-broker`: a RabbitMQ node of this run's own, started with the file-descriptor
        limit raised (`--nofile`, default the hard limit) and stopped at the end.
        `--profile DIR`: py-spy samples the GIL holder of the server process and of the first
        helper process during rounds 2.. (DIR/server-N.txt, DIR/helper-N.txt: the top functions,
        self and total). `--idle-probe S`: after round 1, S seconds with nothing to do, to see
        what being connected costs (CPU seconds per second).
    .venv/bin/python ci/bench_fedavg.py sampled [--registered 10000] [--clients-per-round 100] [--own-broker]
        Client sampling: many registered workers (on fashion-mnist: digits has too few samples
        for 10,000 shares), few trained per round. Goal: 10,000 registered, 100 per round,
        <= 2 s/round. The workers of one process share one connection, its key list and one
        partition of the data (10 processes of 1000: 11 connections in all, with the server's).
    .venv/bin/python ci/bench_fedavg.py secagg [--rounds 6] [--repeat 1] [--workers 10] [--registered 1000] [--clients-per-round 100] [--per-process N]
        Secure aggregation (--secure-aggregation secagg+) against plain FedAvg, the same work in one
        run, plain and secagg+ runs alternating (the order flips every repeat): (a) --workers (10)
        all trained every round, as `scale` runs them (tiny model on digits, a connection each);
        (b) --clients-per-round (100) sampled of --registered (1000), as `sampled` runs them (tiny
        model on fashion-mnist, one helper process whose workers share its connection; or
        --per-process N workers per process). Prints
        s/round (rounds 2..), the ratio (goal: <= 2x at 100 per round), and the bytes and messages
        per round: the server's endpoint's traffic (every frame it sends and accepts: header, meta,
        tensors and signature, not AMQP's framing) in rounds 2.., per round, and that divided by
        the workers trained per round (every message is between the server and one worker, so this
        is a trained worker's sent + received), with the bytes per kind of message. Every party
        runs on this machine's cores: the workers' crypto is not spread over 100 machines.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.learning.tasks import Task
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import SERVER, ServerDeployment, WorkerDeployment, worker_ids
from splitfed.roles.fedavg.common import session_queues
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.registry import ROLES
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import RoleThread, new_session
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport

BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def overhead(args) -> None:
    """Plain loop and distributed run alternate `--repeat` times; each pair gives one ratio."""
    settings = FederatedSettings(dataset=args.dataset, limit=args.limit, test_limit=args.test_limit, rounds=args.rounds, partition="iid")
    table = Table(title=f"FedAvg, 3 workers, {args.dataset} ({args.limit} samples), mean s/round over rounds 2..{args.rounds}")
    for column in ("pair", "plain loop, 1 process", "RabbitMQ, 4 processes", "ratio", "accuracy plain / RabbitMQ"):
        table.add_column(column, justify="right")
    ratios = []
    for pair in range(1, args.repeat + 1):
        _, plain = federated.reference_run(settings)
        distributed = launch.run(fedavg.SCENARIO, settings, FedAvgRun(broker=args.broker))
        # Round 1 includes the workers' start-up; compare the rounds after it.
        plain_seconds = statistics.mean(r.seconds for r in plain[1:])
        broker_seconds = statistics.mean(r["seconds"] for r in distributed["history"][1:])
        ratios.append(broker_seconds / plain_seconds)
        table.add_row(str(pair), f"{plain_seconds:.2f}", f"{broker_seconds:.2f}", f"{ratios[-1]:.3f}x", f"{plain[-1].accuracy:.4f} / {distributed['accuracy']:.4f}")
    table.add_row("median", "", "", f"{statistics.median(ratios):.3f}x", "")
    Console().print(table)


@contextlib.contextmanager
def scale_broker(args):
    """The broker URL to use: `--broker`, or with `--own-broker` a node of this run's own with
    RLIMIT_NOFILE raised (the node inherits it), always stopped afterwards."""
    if not args.own_broker:
        yield args.broker, None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from own_broker import OwnBroker

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(args.nofile or hard, hard) if hard != resource.RLIM_INFINITY else (args.nofile or 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    directory = Path(tempfile.mkdtemp(prefix="splitfed-scale-broker-"))
    broker = OwnBroker(directory)
    broker.start()
    print(f"own RabbitMQ node {broker.node} at {broker.url} (RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})", flush=True)
    try:
        yield broker.url, int((directory / "rabbit.pid").read_text().split()[0])
    finally:
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


def scale(args) -> None:
    title = f"FedAvg scale: tiny model on {args.dataset}, one server, signed updates, all workers in every round"
    if args.clients_per_round:
        title = f"FedAvg scale: tiny model on {args.dataset}, one server, signed updates, {args.clients_per_round} workers sampled per round"
    table = Table(title=title)
    columns = ("workers", "trained per round", "processes", "mean s/round", "max s/round", "per round (s)", "ratio to the first row",
               "CPU s/round: server / helpers / broker", "final accuracy")
    for column in columns:
        table.add_column(column, justify="right")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    base = None
    with scale_broker(args) as (broker, broker_pid):
        for count in args.workers:
            mean, worst, seconds, cpu, accuracy = scale_run(count, args.per_process, args.rounds, broker, args.profile, args.clients_per_round, broker_pid,
                                                            args.idle_probe, args.dataset, args.shared_connection)
            base = base or mean
            table.add_row(str(count), str(min(args.clients_per_round or count, count)), str(-(-count // args.per_process)), f"{mean:.2f}", f"{worst:.2f}",
                          " ".join(f"{s:.2f}" for s in seconds),
                          f"{mean / base:.2f}x", " / ".join("-" if c is None else f"{c:.2f}" for c in cpu), f"{accuracy:.4f}")
            Console(width=180).print(table)
            if worst > args.stop_above:
                break


def sampled(args) -> None:
    """Many registered workers, few trained per round (client sampling)."""
    args.workers = [args.registered]
    args.shared_connection = True
    scale(args)


def secagg(args) -> None:
    """Plain and secagg+ rounds of the same work, alternating, for `scale`'s and `sampled`'s harnesses."""
    setups = [  # (name, registered, trained per round, per process, dataset, one connection per process)
        (f"(a) all {args.workers}", args.workers, None, args.workers, "digits", False),
        (f"(b) {args.clients_per_round} of {args.registered}", args.registered, args.clients_per_round, args.per_process or args.registered, "fashion-mnist", True),
    ]
    table = Table(title=f"FedAvg with and without secure aggregation (secagg+), tiny model, signed messages, mean of rounds 2..{args.rounds}: "
                        f"(a) {args.workers} workers on digits, a connection each, all trained every round; (b) {args.clients_per_round} sampled "
                        f"a round of {args.registered} on fashion-mnist, {-(-args.registered // (args.per_process or args.registered))} helper "
                        "process(es), each sharing one connection among its workers")
    for column in ("setting", "pair", "s/round plain", "s/round secagg+", "ratio", "KB/worker/round plain / secagg+",
                   "messages/round plain / secagg+", "CPU s/round server+helpers: plain / secagg+", "accuracy plain / secagg+"):
        table.add_column(column, justify="right")
    kinds: dict[str, dict] = {}
    with scale_broker(args) as (broker, broker_pid):
        for name, count, per_round, per_process, dataset, shared in setups:
            if name.startswith("(a)") and args.skip_a or name.startswith("(b)") and args.skip_b:
                continue
            trained = per_round or count
            ratios = []
            for repeat in range(args.repeat):
                results = {}
                for mode in (("none", "secagg+") if repeat % 2 == 0 else ("secagg+", "none")):
                    figures: dict = {}
                    mean, _, _, cpu, accuracy = scale_run(count, per_process, args.rounds, broker, None, per_round, broker_pid, 0.0, dataset, shared,
                                                          secure=mode, figures=figures, worker_timeout=args.worker_timeout)
                    results[mode] = (mean, figures, cpu, accuracy)
                    kinds[f"{name}, {mode}"] = figures["kinds"]
                (plain, plain_traffic, plain_cpu, plain_accuracy), (secure, secure_traffic, secure_cpu, secure_accuracy) = results["none"], results["secagg+"]
                ratios.append(secure / plain)
                cpu_of = lambda cpu: "+".join("-" if c is None else f"{c:.2f}" for c in cpu[:2])  # noqa: E731
                table.add_row(name, str(repeat + 1), f"{plain:.2f}", f"{secure:.2f}", f"{secure / plain:.2f}x",
                              f"{plain_traffic['bytes'] / trained / 1e3:.1f} / {secure_traffic['bytes'] / trained / 1e3:.1f}",
                              f"{plain_traffic['messages']:.0f} / {secure_traffic['messages']:.0f}",
                              f"{cpu_of(plain_cpu)} / {cpu_of(secure_cpu)}", f"{plain_accuracy:.4f} / {secure_accuracy:.4f}")
            if args.repeat > 1:
                table.add_row(name, "median", "", "", f"{statistics.median(ratios):.2f}x", "", "", "", "")
            Console(width=200).print(table)
    console = Console(width=200)
    breakdown = Table(title=f"The server's traffic per round by kind of message (rounds 2..{args.rounds}, last repeat): messages / KB")
    breakdown.add_column("kind")
    for run in kinds:
        breakdown.add_column(run, justify="right")
    for kind in sorted({kind for counted in kinds.values() for kind in counted}):
        breakdown.add_row(kind, *(f"{counted[kind][0]:.0f} / {counted[kind][1] / 1e3:.1f}" if kind in counted else "" for counted in kinds.values()))
    console.print(breakdown)
    console.print("KB/worker/round: the server's sent + accepted frames (header, meta, tensors, signature; not AMQP framing) in rounds 2.. per "
                  "round, over the workers trained per round; every message is between the server and one worker, so this is what a trained "
                  "worker sends + receives. messages/round: all of the server's, both ways. CPU: the server's process, then the helper processes "
                  "hosting the workers, per round. Ratio: secagg+ s/round over plain s/round.", soft_wrap=True)




def scale_run(count: int, per_process: int, rounds: int, broker: str = BROKER, profile: Path | None = None,
              clients_per_round: int | None = None, broker_pid: int | None = None, idle_probe: float = 0.0,
              dataset: str = "digits", shared_connection: bool = False, secure: str = "none",
              figures: dict | None = None, worker_timeout: int = 300) -> tuple[float, float, list[float], list, float]:
    """Mean, worst and each round's seconds of rounds 2.., the CPU seconds per round (server
    process, all helpers, broker node) spent in them, and the final accuracy. `secure`: the
    --secure-aggregation of the server and workers. `figures`, when given, gets the server's
    traffic per round in rounds 2..: {"messages", "bytes", "kinds": {kind: (messages, bytes)}}.
    `worker_timeout`: how long a worker waits for the server (its welcome, its turn)."""
    directory = Path(tempfile.mkdtemp(prefix="splitfed-scale-"))
    key_list = keys.generate(directory, ["fedavg-server", *worker_ids(count)])
    session = new_session()
    sampling = {"clients_per_round": clients_per_round} if clients_per_round else {}
    settings = FederatedSettings(dataset=dataset, model="tiny", batch_size=16, rounds=rounds, workers=count, partition="iid", lr=0.05,
                                 secure_aggregation=secure, **sampling)
    server_transport = RabbitTransport(broker, name="scale-server", prefetch=ROLES[SERVER].prefetch(settings))
    identity = Identity.load("fedavg-server", key_list, directory / "fedavg-server.key")
    samplers, cpu_start, cpu_end, idle, faults = [], [], [], [], []

    def start_profiling(progress) -> None:  # noqa: ANN001 (roles.declaration.Progress)
        """After round 1 (start-up, joins) closes: measure and sample only the rounds that count."""
        if progress.event == "round" and progress.done == 1 and idle_probe:
            # Nothing to do for anyone: what the parties spend just being connected.
            before = [cpu_seconds(pids) for pids in parties()]
            time.sleep(idle_probe)
            idle.extend(None if b is None else (cpu_seconds(pids) - b) / idle_probe for b, pids in zip(before, parties()))
        if progress.event == "round" and progress.done == 1:
            counting.append(True)
            cpu_start.extend(cpu_seconds(pids) for pids in parties())
            faults.append(major_faults([helper.pid for helper in helpers]))
        if progress.event == "round" and progress.done == rounds:  # before the done messages go out
            counting.clear()
            cpu_end.extend(cpu_seconds(pids) for pids in parties())
            faults.append(major_faults([helper.pid for helper in helpers]))
            for sampler, _, _ in samplers:
                sampler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        if profile and progress.event == "round" and progress.done == 1:
            spy = Path(sys.executable).with_name("py-spy")
            for name, pid in (("server", os.getpid()), ("helper", helpers[0].pid)):
                raw = profile / f"{name}-{count}.raw"
                command = [str(spy), "record", "--gil", "--nonblocking", "--rate", "50", "--format", "raw", "-o", str(raw), "--pid", str(pid)]
                samplers.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw, profile / f"{name}-{count}.txt"))

    server = FedAvgServer(settings, ServerDeployment(session=session, timeout=600), server_transport, identity, on_progress=start_profiling)
    phases = timed_phases(server)
    counting: list[bool] = []  # non-empty while rounds 2.. run
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    count_frame = server.endpoint._count

    def counted(kind: str, direction: str, size: int) -> None:
        """The server endpoint's count of every frame it sends or accepts, by kind, in rounds 2.. only."""
        count_frame(kind, direction, size)
        if counting:
            by_kind[kind][0] += 1
            by_kind[kind][1] += size

    server.endpoint._count = counted
    helpers = [
        subprocess.Popen([sys.executable, __file__, "workers", "--session", session, "--first", str(first), "--count", str(min(per_process, count - first)),
                          "--total", str(count), "--rounds", str(rounds), "--key-list", str(key_list), "--broker", broker, "--dataset", dataset,
                          "--secure-aggregation", secure, "--timeout", str(worker_timeout),
                          *(["--shared-connection"] if shared_connection else [])])
        for first in range(0, count, per_process)
    ]
    parties = lambda: ([os.getpid()], [helper.pid for helper in helpers], [broker_pid] if broker_pid else [])  # noqa: E731
    try:
        result = server.run()
    finally:
        for sampler, _, _ in samplers:
            if sampler.poll() is None:
                sampler.send_signal(signal.SIGINT)
        for helper in helpers:
            helper.wait(300)
        for queue in session_queues(session, count):  # once the workers are gone: 24 hours of expiry is long for thousands of queues
            server_transport.delete(queue)
        server_transport.close()
        for sampler, raw, summary in samplers:
            sampler.wait(60)
            if raw.exists():
                summary.write_text(summarise(raw, f"{name_of(summary)}, {count} workers, rounds 2..{rounds}"))
        shutil.rmtree(directory, ignore_errors=True)
    seconds = [r["seconds"] for r in result["history"][1:]]  # round 1 waits for the helpers to start
    cpu = [(end - start) / len(seconds) if end is not None and start is not None else None for start, end in zip(cpu_start, cpu_end)]
    send, collect, rest = (statistics.mean(phase[1:]) for phase in zip(*phases))
    collecting = "the secure sum's stages (keys, shares, masked inputs, reveals)" if secure != "none" else "collecting the updates"
    print(f"{count} workers{'' if secure == 'none' else ', ' + secure}, rounds 2..{rounds}, mean s/round: sending the models {send:.2f}, then {collecting} {collect:.2f}, "
          f"the rest (aggregate, test, checkpoint, acks) {rest:.2f}", flush=True)
    if figures is not None:
        figures["kinds"] = {kind: (messages / len(seconds), size / len(seconds)) for kind, (messages, size) in by_kind.items()}
        figures["messages"] = sum(messages for messages, _ in figures["kinds"].values())
        figures["bytes"] = sum(size for _, size in figures["kinds"].values())
    if idle:
        print(f"{count} workers, idle (after round 1, {idle_probe:.0f}s): CPU s/s server / helpers / broker "
              + " / ".join("-" if c is None else f"{c:.2f}" for c in idle), flush=True)
    print(f"{count} workers, rounds 2..{rounds}: helpers' major page faults per round {(faults[-1] - faults[0]) / len(seconds):.0f}, "
          f"memory available at the end {available_mib()} MiB", flush=True)
    return statistics.mean(seconds), max(seconds), seconds, cpu, result["accuracy"]


def timed_phases(server: FedAvgServer) -> list[tuple[float, float, float]]:
    """Each round's seconds spent sending the models, collecting after the last send, and the
    rest of the round: the server's methods wrapped on this one instance."""
    phases: list[tuple[float, float, float]] = []
    marks: dict[str, float] = {}
    collect, run_round = server.collect, server.run_round

    def timed(send):  # noqa: ANN001, ANN202
        def timed_send(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            marks.setdefault("send", time.perf_counter())
            return send(*args, **kwargs)
        return timed_send

    def timed_collect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        marks.setdefault("collect", time.perf_counter())  # a secure round collects four times: from the first
        try:
            return collect(*args, **kwargs)
        finally:
            marks["collected"] = time.perf_counter()

    def timed_round() -> None:
        marks.clear()
        started = time.perf_counter()
        run_round()
        sent = marks.get("send", marks["collect"])
        phases.append((marks["collect"] - sent, marks["collected"] - marks["collect"], time.perf_counter() - started - (marks["collected"] - sent)))

    server.send_models = timed(server.send_models)
    server.collect, server.run_round = timed_collect, timed_round
    return phases


def major_faults(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[9])
    return total


def available_mib() -> int:
    return next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))


def cpu_seconds(pids: list[int]) -> float | None:
    """User and system CPU seconds the processes have used so far (Linux /proc)."""
    if not pids:
        return None
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def name_of(summary: Path) -> str:
    return summary.stem.split("-")[0] + (" process" if summary.stem.startswith("server") else " process 0 (workers 0..)")


def summarise(raw: Path, title: str, top: int = 30) -> str:
    """py-spy's raw (collapsed) stacks, as the functions with most samples: self and total.
    Sampled with --gil: only the thread holding the GIL, so a sample is 20 ms of Python on the CPU
    (native work done without the GIL, torch kernels and socket calls, is not seen)."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")" if " (" in frame else frame
                  for frame in stack.split(";")[1:]]  # the first frame names the thread
        samples += int(count)
        if frames:
            own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    lines = [f"{title}: {samples} samples of the GIL holder at 50/s = {samples / 50:.1f} s", "", "self (seconds, % of samples):"]
    lines += [f"{n / 50:8.2f} {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total (seconds, % of samples):"]
    lines += [f"{n / 50:8.2f} {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(lines) + "\n"


def workers(args) -> None:
    """A helper process hosting `count` workers, each on its own thread, with a connection of its
    own or (--shared-connection) one for the whole process, which also loads the key list and
    partitions the data once for all its workers."""
    torch.set_num_threads(1)
    settings = PartitionSettings(dataset=args.dataset, model="tiny", batch_size=16, workers=args.total, partition="iid", lr=0.05,
                                 secure_aggregation=args.secure_aggregation)
    shared = RabbitTransport(args.broker, name=f"workers-{args.first}") if args.shared_connection else None
    trusted = keys.KeyList.load(args.key_list) if shared else None
    hosted = list(range(args.first, args.first + args.count))
    shares = dict(zip(hosted, federated.worker_shares(Task(settings), settings, hosted))) if shared else None
    threads = []
    for index in hosted:
        name = f"worker-{index}"
        transport = shared or RabbitTransport(args.broker, name=name)
        private_key = args.key_list.parent / f"{name}.key"
        identity = Identity(keys.load_private(private_key, name), trusted) if shared else Identity.load(name, args.key_list, private_key)
        role = FedAvgWorker(settings, WorkerDeployment(session=args.session, timeout=args.timeout, worker_id=name, index=index), transport, identity,
                            share=shares[index] if shared else None)
        threads.append((transport, RoleThread(name, role.run)))
    for _, thread in threads:
        thread.start()
    for _, thread in threads:
        thread.outcome(3600)
    for transport in {id(transport): transport for transport, _ in threads}.values():
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead")
    over.add_argument("--dataset", default="fashion-mnist")
    over.add_argument("--limit", type=int, default=12000)
    over.add_argument("--test-limit", type=int, default=2000)
    over.add_argument("--rounds", type=int, default=4)
    over.add_argument("--broker", default=BROKER)
    over.add_argument("--repeat", type=int, default=3)
    many = commands.add_parser("scale")
    many.add_argument("--workers", type=int, nargs="+", default=[25, 50, 100, 200])
    many.add_argument("--clients-per-round", type=int, default=None, help="client sampling: workers drawn per round (default: all)")
    many.add_argument("--dataset", default="digits")
    many.add_argument("--per-process", type=int, default=25)
    many.add_argument("--shared-connection", action="store_true", help="one connection per helper process for all its workers")
    few = commands.add_parser("sampled", help="10,000 registered workers, 100 sampled per round")
    few.add_argument("--registered", type=int, default=10000)
    few.add_argument("--clients-per-round", type=int, default=100)
    few.add_argument("--dataset", default="fashion-mnist", help="digits has fewer samples than 10,000 workers")
    few.add_argument("--per-process", type=int, default=1000, help="workers per helper process, sharing its connection")
    for parser_ in (many, few):
        parser_.add_argument("--rounds", type=int, default=4)
        parser_.add_argument("--broker", default=BROKER)
        parser_.add_argument("--own-broker", action="store_true", help="start a RabbitMQ node of this run's own with RLIMIT_NOFILE raised")
        parser_.add_argument("--nofile", type=int, default=None, help="the file-descriptor limit for --own-broker (default: the hard limit)")
        parser_.add_argument("--profile", type=Path, default=None, help="py-spy the server and the first helper into this folder")
        parser_.add_argument("--idle-probe", type=float, default=0.0, help="after round 1, measure this many seconds of idle CPU")
        parser_.add_argument("--stop-above", type=float, default=10.0, help="skip the larger counts once a round took longer (s)")
    helper = commands.add_parser("workers")
    helper.add_argument("--session", required=True)
    helper.add_argument("--first", type=int, required=True)
    helper.add_argument("--count", type=int, required=True)
    helper.add_argument("--total", type=int, required=True)
    helper.add_argument("--rounds", type=int, required=True)
    helper.add_argument("--key-list", type=Path, required=True)
    helper.add_argument("--broker", default=BROKER)
    helper.add_argument("--dataset", default="digits")
    helper.add_argument("--shared-connection", action="store_true")
    helper.add_argument("--secure-aggregation", default="none")
    helper.add_argument("--timeout", type=float, default=300, help="how long a worker waits for the server")
    secure = commands.add_parser("secagg", help="round time and traffic with secure aggregation against without")
    secure.add_argument("--rounds", type=int, default=6)
    secure.add_argument("--repeat", type=int, default=1, help="plain/secagg+ pairs per setting (the order flips every pair)")
    secure.add_argument("--workers", type=int, default=10, help="(a): workers, all trained every round")
    secure.add_argument("--registered", type=int, default=1000, help="(b): registered workers")
    secure.add_argument("--clients-per-round", type=int, default=100, help="(b): workers sampled per round")
    secure.add_argument("--per-process", type=int, default=None, help="(b): workers per helper process, sharing its connection (default: all in one)")
    secure.add_argument("--skip-a", action="store_true", help="only (b)")
    secure.add_argument("--worker-timeout", type=int, default=1800,
                        help="how long a worker waits for the server: starting 1000 workers on a busy 2-core machine can take minutes")
    secure.add_argument("--skip-b", action="store_true", help="only (a)")
    secure.add_argument("--broker", default=BROKER)
    secure.add_argument("--own-broker", action="store_true", help="start a RabbitMQ node of this run's own with RLIMIT_NOFILE raised")
    secure.add_argument("--nofile", type=int, default=None, help="the file-descriptor limit for --own-broker (default: the hard limit)")
    args = parser.parse_args()
    {"overhead": overhead, "scale": scale, "sampled": sampled, "workers": workers, "secagg": secagg}[args.command](args)


if __name__ == "__main__":
    main()
