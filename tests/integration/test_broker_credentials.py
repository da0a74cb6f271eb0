"""The broker's password reaches a role as a file, never as an environment value: --broker-file
(the whole URL list) and --broker-credentials (a folder with `username` and `password`, as a
Kubernetes Secret mounts them), against the real RabbitMQ with a user of its own whose password
needs percent-encoding; and the roles `splitfed run --launch processes` starts get a file too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pika
import pytest

from splitfed.learning.settings import SplitSettings
from splitfed.scenarios import split
from splitfed.scenarios.launch import ProcessGroup
from splitfed.scenarios.split import SplitRun
from splitfed.transport import Connection
from splitfed.transport.connection import SECRET_MAX_BYTES
from tests.shared_broker import BROKER, delete_queues_of, queues_of

PASSWORD = "p@ss:w/rd%?#" + uuid.uuid4().hex[:8]  # every character a URL gives meaning to


@pytest.fixture
def broker_user(broker_url):
    """A RabbitMQ user of the test's own, with PASSWORD, allowed everything on the default vhost; deleted afterwards."""
    name = f"splitfed-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl = ["rabbitmqctl", "--quiet"]
    subprocess.run([*rabbitmqctl, "add_user", name, PASSWORD], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*rabbitmqctl, "set_permissions", "-p", "/", name, ".*", ".*", ".*"], check=True, capture_output=True, timeout=60)
        yield name
    finally:
        subprocess.run([*rabbitmqctl, "delete_user", name], check=False, capture_output=True, timeout=60)


def secret_folder(folder: Path, **files: str) -> Path:
    """Files as a Secret volume holds them: one per key, the value with a trailing newline."""
    folder.mkdir()
    for key, value in files.items():
        (folder / key).write_text(value + "\n")
    return folder


def wait_for_line(process: subprocess.Popen, log: Path, line: str) -> None:
    """Until the role's log says `line` (it has connected and declared its queues); it must not exit first."""
    deadline = time.monotonic() + 120  # a hang guard only: the role logs it within seconds
    while line not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def test_the_credentials_folder_is_put_into_every_url_percent_encoded(tmp_path):
    folder = secret_folder(tmp_path / "broker", username="fl user", password=PASSWORD)
    connection = Connection(broker="amqp://old:old@node-0:5672/,amqp://node-1:5672/%2F", broker_credentials=folder)
    urls = connection.broker_urls().split(",")
    assert [url.rsplit("@", 1)[1] for url in urls] == ["node-0:5672/", "node-1:5672/%2F"]
    for url in urls:  # what the transport hands pika, decoded by pika itself
        credentials = pika.URLParameters(url).credentials
        assert (credentials.username, credentials.password) == ("fl user", PASSWORD)


def test_the_broker_file_replaces_the_broker_value(tmp_path):
    path = tmp_path / "url"
    path.write_text("amqp://a:b@node-0:5672/,amqp://a:b@node-1:5672/\n")
    assert Connection(broker_file=path).amqp_broker("test").urls == ("amqp://a:b@node-0:5672/", "amqp://a:b@node-1:5672/")


BAD_FILES = {  # name -> (what the file holds (None: no file), what the refusal says)
    "missing": (None, "cannot read"),
    "empty": ("\n", "is empty"),
    "too large": ("a" * (SECRET_MAX_BYTES + 1), "larger than"),
    "not text": (b"\xff\xfe", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_broker_file_is_refused_in_one_line_before_anything_connects(case, tmp_path):
    content, says = BAD_FILES[case]
    path = tmp_path / "url"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    completed = subprocess.run(
        [sys.executable, "-m", "splitfed", "serve", "relay", "--session", "s", "--broker-file", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert completed.returncode == 2 and len(errors) == 1, completed.stderr[-2000:]
    assert "--broker-file" in errors[0] and says in errors[0] and str(path) in errors[0]
    assert "Traceback" not in completed.stderr


def test_a_broker_file_and_a_broker_value_are_refused_together(tmp_path):
    path = tmp_path / "url"
    path.write_text("amqp://a:b@node-0:5672/")
    with pytest.raises(ValueError, match="give --broker or --broker-file, not both"):
        Connection(broker="amqp://c:d@node-1:5672/", broker_file=path).amqp_broker("test")


@pytest.mark.broker
def test_a_role_given_the_credentials_folder_connects_with_no_password_in_its_environment(broker_user, tmp_path):
    folder = secret_folder(tmp_path / "broker", username=broker_user, password=PASSWORD)
    session = f"creds-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "relay.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPLITFED_")}
    env.update(SPLITFED_BROKER="amqp://127.0.0.1:5672/", SPLITFED_BROKER_CREDENTIALS=str(folder), SPLITFED_SESSION=session, SPLITFED_TIMEOUT="600")
    with log.open("wb") as output:
        relay = subprocess.Popen([sys.executable, "-m", "splitfed", "serve", "relay"], env=env, stdout=output, stderr=output)
    try:
        wait_for_line(relay, log, "relay ready on")
        assert queues_of(session), "the relay declared no queue: it did not reach the broker as the test's user"
        environment = environment_of(relay.pid)
        assert PASSWORD not in "\0".join(f"{key}={value}" for key, value in environment.items())
        assert environment["SPLITFED_BROKER_CREDENTIALS"] == str(folder)
    finally:
        relay.kill()
        relay.wait()
        delete_queues_of(BROKER, session)


@pytest.mark.broker
def test_the_roles_a_run_starts_read_its_password_from_a_file_only_they_can_read(broker_user, tmp_path):
    url = f"amqp://{broker_user}:{quote(PASSWORD, safe='')}@127.0.0.1:5672/"
    run = SplitRun(broker=url, via="relay", timeout=600).resolved()
    relay = next(launch for launch in split.plan(SplitSettings(dataset="digits"), run, tmp_path) if launch.name == "relay")
    group = ProcessGroup(run, tmp_path)
    try:
        member = group.start(relay)
        wait_for_line(member.process, member.log_path, "relay ready on")
        environment = environment_of(member.process.pid)
        assert url not in "\0".join(environment.values()) and PASSWORD not in "\0".join(environment.values())
        broker_file = Path(environment["SPLITFED_BROKER_FILE"])
        assert broker_file.read_text() == url and broker_file.stat().st_mode & 0o777 == 0o600
        assert "SPLITFED_BROKER" not in environment  # the default would do no harm, but nothing is passed that is not needed
    finally:
        group.stop()
        delete_queues_of(BROKER, run.session)
