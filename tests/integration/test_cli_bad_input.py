"""Every kind of bad input to the CLI gets one clear line on stderr and a non-zero exit, before
anything trains or connects; never a traceback, never a hang."""

import socket
import subprocess
import sys

import pytest

from tests.ports import free_port

BROKER = "amqp://guest:guest@127.0.0.1:5672/"

CASES = {  # name -> (arguments, exit code, what the line says)
    "shards:0": (["run", "fedavg", "--partition", "shards:0"], 2, "K must be at least 1"),
    "classes the data set lacks": (["run", "fedavg", "--partition", "classes:0-3,4-6,7-12"], 2, "not a range within 0-9"),
    "classes for too few workers": (["run", "fedavg", "--partition", "classes:0-4,5-9"], 2, "2 groups of classes for 3 workers"),
    "a worker with no samples": (["run", "fedavg", "--dataset", "digits", "--limit", "2", "--partition", "iid"], 2, "leaves worker 2 with no samples"),
    "lr nan": (["run", "centralized", "--lr", "nan"], 2, "--lr nan: not a finite number"),
    "lr not a number": (["run", "centralized", "--lr", "fast"], 2, "--lr 'fast': not a number"),
    "timeout nan": (["run", "split", "--timeout", "nan"], 2, "--timeout nan: not a finite number"),
    "unknown data set": (["run", "centralized", "--dataset", "cifar"], 2, "choose one of fashion-mnist, mnist, digits"),
    "chunk size too small": (["run", "split", "--broker", BROKER, "--chunk-size", "1024"], 2, "--chunk-size 1024: must be at least 131072"),
    "session too long": (["run", "split", "--session", "s" * 300], 2, "--session"),
    "worker id with a space": (["serve", "fedavg-worker", "--session", "s", "--worker-id", "bad id", "--index", "0"], 2, "--worker-id 'bad id': must match"),
    "missing TLS file": (["run", "split", "--broker", "amqps://guest:secret@127.0.0.1:5671/", "--tls-ca", "/missing/ca.pem"], 2, "TLS file /missing/ca.pem does not exist"),
    "TLS with plain AMQP": (["serve", "relay", "--session", "s", "--broker", BROKER, "--tls-ca", "/etc/hostname"], 2, "need an amqps:// broker URL"),
    "results into a missing folder": (["run", "centralized", "--dataset", "digits", "--out", "/missing/folder/r.json"], 2, "folder /missing/folder does not exist"),
    "required option missing": (["serve", "relay"], 2, "--session (or SPLITFED_SESSION) is required"),
    "unknown broker scheme": (["run", "split", "--broker", "ftp://user:secret@host/"], 2, "needs --broker amqp://"),
    "label dp in u-shaped mode": (["run", "split", "--mode", "u-shaped", "--label-dp", "1"], 2, "--label-dp is for vanilla mode"),
    "gradient defence in vanilla mode": (["run", "splitnn", "--gradient-defence", "max-norm"], 2, "--gradient-defence max-norm is for u-shaped mode"),
    "activation noise without a clip": (["run", "split", "--activation-noise", "0.5"], 2, "give --activation-clip C too"),
    "label dp epsilon out of range": (["run", "split", "--label-dp", "0"], 2, "--label-dp"),
    "secure aggregation with a robust rule": (["run", "fedavg", "--secure-aggregation", "secagg+", "--strategy", "krum"], 2,
                                               "--strategy krum needs each worker's update"),
    "secagg threshold at half the neighbours": (["run", "fedavg", "--workers", "9", "--partition", "iid", "--secure-aggregation", "secagg+",
                                                 "--secagg-neighbours", "4", "--secagg-threshold", "2"], 2, "--secagg-threshold 2 must be above k/2"),
    "adaptive clipping with local dp": (["run", "fedavg", "--dp", "local", "--dp-adaptive-clip"], 2, "it is for --dp central, not local"),
    "negative nopeek weight": (["serve", "split-client", "--session", "s", "--nopeek-weight", "-1"], 2, "--nopeek-weight"),
}


def run_cli(args, timeout=120):
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(completed, code, says):
    assert completed.returncode == code, completed.stderr[-2000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and "secret" not in completed.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_line(case):
    args, code, says = CASES[case]
    completed = run_cli(args)
    assert_one_clear_line(completed, code, says)
    assert "epoch 1" not in completed.stderr and "round 1" not in completed.stderr  # refused before any training


def test_a_metrics_port_in_use(broker_url):
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        completed = run_cli(["serve", "relay", "--session", "s", "--broker", broker_url, "--metrics-port", str(port)])
    assert_one_clear_line(completed, 2, f"cannot serve metrics on port {port}")


def test_a_worker_that_fails_early_fails_the_run_at_once(broker_url, tmp_path):
    from splitfed.security import keys

    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", "worker-0", "worker-1", "worker-2"])
    (tmp_path / "keys" / "worker-2.key").unlink()  # worker-2 cannot sign: it stops at start
    # A run that waited for worker-2 would wait out the server's --timeout of 600 s: the hang guard
    # of 300 s ends it first, so an answer at all means the launcher did not wait.
    completed = run_cli(["run", "fedavg", "--dataset", "digits", "--partition", "iid", "--rounds", "2", "--broker", broker_url,
                         "--key-list", str(key_list), "--timeout", "600"], timeout=300)
    assert completed.returncode == 4 and "worker-2 exited with code 2" in completed.stderr and "worker-2.key" in completed.stderr


def test_keys_are_private_never_overwritten_and_never_written_outside_their_folder(tmp_path):
    import os
    import stat

    folder = tmp_path / "keys"
    completed = run_cli(["keys", "generate", "--workers", "1", "--out", str(folder)])
    assert completed.returncode == 0, completed.stderr
    key = folder / "worker-0.key"
    first = key.read_bytes()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = run_cli(["keys", "generate", "--workers", "1", "--out", str(folder)])
    assert_one_clear_line(again, 2, "already exist")
    assert key.read_bytes() == first  # refused before anything was written
    os.chmod(key, 0o644)
    forced = run_cli(["keys", "generate", "--workers", "1", "--out", str(folder), "--force"])
    assert forced.returncode == 0 and key.read_bytes() != first and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    escaping = run_cli(["keys", "generate", "--party", "../../escaped", "--no-server", "--out", str(folder)])
    assert_one_clear_line(escaping, 2, "party name '../../escaped' must match")
    assert not (tmp_path.parent / "escaped.key").exists()


def test_a_private_key_readable_by_others_is_warned_about(tmp_path, caplog):
    import logging
    import os

    from splitfed.security import keys

    keys.generate(tmp_path, ["worker-0"])
    os.chmod(tmp_path / "worker-0.key", 0o644)
    with caplog.at_level(logging.WARNING, "splitfed.security.keys"):
        keys.load_private(tmp_path / "worker-0.key", "worker-0")
    assert any("can be read by others" in record.getMessage() for record in caplog.records)
