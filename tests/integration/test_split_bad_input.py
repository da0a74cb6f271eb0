"""Hostile input published straight onto the queues of a running split run over RabbitMQ:
every role refuses it, counts it, survives, and the run ends exactly as a clean one."""

import numpy as np
import pytest

from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode
from splitfed.roles.endpoint import queue_name
from splitfed.learning.settings import SplitSettings
from splitfed.roles.split.common import CLIENT, RELAY, SERVER
from splitfed.scenarios import launch, split
from splitfed.scenarios.split import SplitRun
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import max_param_diff


def frame(session, sender, seq, kind="activations", **tensors) -> bytes:
    return encode(Message(kind, session, sender, seq=seq, meta={"train": True}, tensors=tensors))


def corrupted_copies(message: Message) -> list[Message]:
    """Copies of a real frame, same sender and sequence number, each broken in one way."""
    name = next(n for n, t in message.tensors.items() if t.dtype == np.float32)
    array = message.tensors[name]
    nan = array.copy()
    nan.flat[0] = np.nan
    variants = [{name: array[:, :-1]}, {name: array.astype(np.float64)}, {name: nan}]  # shape, dtype, nonfinite
    if "y" in message.tensors:
        variants.append({"y": message.tensors["y"] + 100})  # labels out of range
    return [Message(message.kind, message.session, message.sender, message.seq, meta=message.meta, tensors={**message.tensors, **change}) for change in variants]


class Meddler(RabbitTransport):
    """A party's real connection, plus an attacker with access to the broker: before some real
    frames it publishes corrupted copies with the same sequence number straight into the
    receiver's queue, and after others it replays the frame (a duplicate) and sends it again
    renumbered far ahead (out of order) along the same route."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        receiver = queue_name(message.session, SERVER if message.sender == CLIENT else CLIENT)
        if message.seq % 7 == 3 and message.tensors:
            for bad in corrupted_copies(message):
                super().publish(receiver, encode(bad))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        if message.seq % 5 == 0 and message.kind != "done":
            super().publish(queue, body)
            message.seq += 1000
            super().publish(queue, encode(message))


@pytest.mark.parametrize("via", ["relay", "direct"])
def test_bad_input_is_rejected_counted_and_harmless(broker_url, session, digits_baseline, tmp_path, via):
    _, baseline_model = digits_baseline
    x, y = np.ones((4, 128), np.float32), np.zeros(4, np.int64)
    nan = x.copy()
    nan[0, 0] = np.inf
    waiting_before_start = [
        b"garbage bytes", b"\x80\x04\x95 a pickle would be here", frame(session, CLIENT, 1, x=x, y=y)[:-7],  # truncated
        frame(session, CLIENT, 1, x=nan, y=y), frame(session, CLIENT, 1, x=x.astype(np.int16)),  # dtype off the whitelist
        frame("another-session", CLIENT, 1, x=x, y=y), frame(session, "mallory", 1, x=x, y=y),
    ]
    queues = [queue_name(session, role) for role in (SERVER, CLIENT, *((RELAY,) if via == "relay" else ()))]
    with RabbitTransport(broker_url, name="attacker") as attacker:
        for queue in queues:
            attacker.declare(queue)
            for bad in waiting_before_start:
                attacker.publish(queue, bad)

        settings = SplitSettings(dataset="digits", epochs=1, batch_size=32)
        result = launch.run(
            split.SCENARIO, settings,
            SplitRun(broker=broker_url, launch="threads", session=session, via=via, timeout=60, save_model=tmp_path / "model.safetensors"),
            connect_as=lambda role: (Meddler if role in (CLIENT, SERVER) else RabbitTransport)(broker_url, name=f"{role}-{session}"),
        )
    assert max_param_diff(baseline_model, tmp_path / "model.safetensors") <= 1e-5
    assert result["accuracy"] > 0.5

    # The relay keeps no sequence state (so it can restart): the halves drop what it forwards twice.
    expected = {
        SERVER: ["malformed", "shape", "dtype", "nonfinite", "value", "session", "sender", "duplicate", "out-of-order"],
        CLIENT: ["malformed", "shape", "dtype", "nonfinite", "session", "sender", "duplicate", "out-of-order"],
    }
    if via == "relay":
        expected[RELAY] = ["malformed", "nonfinite", "dtype", "session", "sender"]
    for role, reasons in expected.items():
        for reason in reasons:
            assert rejected_count(role, session, reason) >= 1, f"{role} did not count a {reason} rejection"


class Forger(RabbitTransport):
    """Someone on the broker without a key: before each of the client's real frames it sends a
    well-formed copy with the same sequence number and different numbers, straight to the
    server (and the relay), one unsigned and one signed with a key of its own."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.tensors and message.kind == "activations":
            def forged() -> Message:
                zeros = {name: np.zeros_like(array) for name, array in message.tensors.items()}
                return Message(message.kind, message.session, message.sender, message.seq, meta=message.meta, tensors=zeros)

            stranger = keys.Signer(CLIENT, keys.Ed25519PrivateKey.generate())
            for target in {queue, queue_name(message.session, SERVER)}:
                super().publish(target, encode(forged()))
                super().publish(target, sign(forged(), stranger))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def sign(message: Message, signer) -> bytes:
    from splitfed.protocol import encode_body, signed_bytes

    body = encode_body(message.tensors)
    message.sig = signer.sign(signed_bytes(message, body))
    return encode(message, body)


@pytest.mark.parametrize("via", ["relay", "direct"])
def test_with_keys_forged_frames_in_sequence_are_refused(broker_url, session, digits_baseline, tmp_path, via):
    _, baseline_model = digits_baseline
    key_list = keys.generate(tmp_path / "keys", [CLIENT, SERVER])
    settings = SplitSettings(dataset="digits", epochs=1, batch_size=32)
    launch.run(
        split.SCENARIO, settings,
        SplitRun(broker=broker_url, launch="threads", session=session, via=via, timeout=60, save_model=tmp_path / "model.safetensors", key_list=key_list),
        connect_as=lambda role: (Forger if role == CLIENT else RabbitTransport)(broker_url, name=f"{role}-{session}"),
    )
    assert max_param_diff(baseline_model, tmp_path / "model.safetensors") <= 1e-5
    first_hop = RELAY if via == "relay" else SERVER
    for role in {first_hop, SERVER}:
        assert rejected_count(role, session, "unsigned") >= 1 and rejected_count(role, session, "signature") >= 1, role
