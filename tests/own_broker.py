"""A RabbitMQ node of the test's own, beside the machine's broker: its own node name, ports,
data folder and Erlang cookie, optionally with a TLS-only listener and a CA made here. Tests may
stop and restart it without disturbing anything else. `BrokerCluster` joins three of them into
one cluster, whose nodes a test may kill."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


@dataclass
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verifying against it must fail


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, sans: list | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path) -> TLSFiles:
    """A self-signed CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (directory / "ca.pem").write_bytes(_certificate("splitfed test CA", ca_key, "splitfed test CA", ca_key, ca=True).public_bytes(pem))
    (directory / "other-ca.pem").write_bytes(_certificate("someone else's CA", other_key, "someone else's CA", other_key, ca=True).public_bytes(pem))
    files = {}
    for party, sans in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"splitfed {party}", key, "splitfed test CA", ca_key, ca=False, sans=sans)
        (directory / f"{party}.pem").write_bytes(cert.public_bytes(pem))
        files[party] = (directory / f"{party}.pem", _write_key(key, directory / f"{party}-key.pem"))
    return TLSFiles(directory / "ca.pem", *files["server"], *files["client"], directory / "other-ca.pem")


class OwnBroker:
    """`prometheus`: enable the rabbitmq_prometheus plugin on `prometheus_port` (127.0.0.1), with
    statistics collected every second rather than every five."""

    def __init__(self, directory: Path, tls: TLSFiles | None = None, prometheus: bool = False, cookie: str | None = None):
        self.directory = directory
        self.tls = tls
        self.port = free_port()
        self.prometheus_port = free_port() if prometheus else None
        self.node = f"splitfed-{secrets.token_hex(4)}@localhost"
        home = directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(16))  # nodes of one cluster share theirs
        cookie_file.chmod(0o400)
        listener = ["listeners.tcp = none", f"listeners.ssl.1 = 127.0.0.1:{self.port}"] if tls else [f"listeners.tcp.1 = 127.0.0.1:{self.port}"]
        if tls:
            listener += [
                f"ssl_options.cacertfile = {tls.ca}", f"ssl_options.certfile = {tls.server_cert}", f"ssl_options.keyfile = {tls.server_key}",
                "ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true",
            ]
        if prometheus:
            listener += [f"prometheus.tcp.port = {self.prometheus_port}", "prometheus.tcp.ip = 127.0.0.1", "collect_statistics_interval = 1000"]
        (directory / "rabbitmq.conf").write_text("\n".join(listener) + "\n")
        (directory / "enabled_plugins").write_text("[rabbitmq_prometheus].\n" if prometheus else "[].\n")
        (directory / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ, "HOME": str(home), "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"), "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"), "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"), "RABBITMQ_PID_FILE": str(directory / "rabbit.pid"),
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> OwnBroker:
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the node without waiting for it (a cluster's nodes boot side by side)."""
        log = (self.directory / "server.out").open("wb")
        self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> OwnBroker:
        ready = self.ctl("wait", str(self.directory / "rabbit.pid"), "--timeout", "120", timeout=150)
        if ready.returncode != 0:
            self.stop()
            raise RuntimeError(f"own RabbitMQ node did not start: {ready.stderr}\n{(self.directory / 'server.out').read_text()[-3000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL the Erlang VM, as a crashed machine would go: no goodbye to clients or peers.
        The pid file names the VM; the `rabbitmq-server` script above it then exits."""
        if self.process is None or self.process.poll() is not None:
            return
        pid_file = self.directory / "rabbit.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        else:  # the VM has not come far enough to name itself; nothing beneath the script yet
            self.process.kill()
        self.process.wait(30)

    def restart_app(self) -> None:
        """Stop and start the broker application: every connection is closed by the broker."""
        for command in ("stop_app", "start_app"):
            done = self.ctl(command)
            assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.ctl("stop", timeout=60)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BrokerCluster:
    """`size` OwnBroker nodes on this machine, one Erlang cookie, joined into one cluster. Use it
    as a context manager: leaving kills every node and deletes `directory`, whatever happened."""

    def __init__(self, directory: Path, size: int = 3):
        self.directory = directory
        cookie = secrets.token_hex(16)
        self.nodes = [OwnBroker(directory / f"node-{index}", cookie=cookie) for index in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def broker(self, first: int = 0) -> str:
        """A --broker value naming every node, node `first` first: a new connection lands there,
        so a test knows where each client, and each queue it declares, lives."""
        return ",".join(self.urls[first:] + self.urls[:first])

    def __enter__(self) -> BrokerCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready()
        first, *others = self.nodes
        for node in others:
            for command in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                done = node.ctl(*command)
                if done.returncode != 0:
                    raise RuntimeError(f"{node.node}: rabbitmqctl {' '.join(command)} failed: {done.stderr}")
        running = first.ctl("eval", "length(rabbit_nodes:all_running()).")
        if running.stdout.strip() != str(len(self.nodes)):
            raise RuntimeError(f"cluster of {len(self.nodes)} nodes formed with {running.stdout.strip()} running: {running.stderr}")

    def queue_info(self, queue: str, item: str) -> str:
        """One `rabbitmqctl list_queues` item of `queue` (type, leader, members...), asked of a
        node still running."""
        alive = next(node for node in self.nodes if node.process is not None and node.process.poll() is None)
        listing = alive.ctl("list_queues", "--quiet", "--no-table-headers", "name", item, timeout=60)
        for line in listing.stdout.splitlines():
            name, _, value = line.partition("\t")
            if name == queue:
                return value.strip()
        raise LookupError(f"{queue!r} is not listed: {listing.stdout!r} {listing.stderr!r}")

    def leader(self, queue: str) -> OwnBroker:
        """The node that leads quorum queue `queue`."""
        name = self.queue_info(queue, "leader")
        return next(node for node in self.nodes if node.node == name)

    def close(self) -> None:
        """Kill rather than stop: the data goes with the folder, so a clean shutdown (slow while
        quorum queues wait for their peers) would keep nothing worth having. Every node is
        killed and the folder deleted even if one kill fails."""
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, self.directory, ignore_errors=True)  # last: callbacks run in reverse
            for node in self.nodes:
                cleanup.callback(node.kill)
