"""A RabbitMQ node of the test's own, beside the machine's broker: its own node name, ports,
data folder and Erlang cookie, optionally with a TLS-only listener and a CA made here. Tests may
stop and restart it without disturbing anything else."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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

    def __init__(self, directory: Path, tls: TLSFiles | None = None, prometheus: bool = False):
        self.directory = directory
        self.tls = tls
        self.port = free_port()
        self.prometheus_port = free_port() if prometheus else None
        self.node = f"splitfed-{secrets.token_hex(4)}@localhost"
        home = directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
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
        log = (self.directory / "server.out").open("wb")
        self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        ready = self.ctl("wait", str(self.directory / "rabbit.pid"), "--timeout", "120", timeout=150)
        if ready.returncode != 0:
            self.stop()
            raise RuntimeError(f"own RabbitMQ node did not start: {ready.stderr}\n{(self.directory / 'server.out').read_text()[-3000:]}")
        return self

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
