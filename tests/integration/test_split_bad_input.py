"""Hostile input published straight onto the queues of a running split run over RabbitMQ:
every role refuses it, counts it, survives, and the run ends exactly as a clean one."""

import numpy as np
import pytest

from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode
from splitfed.roles.endpoint import queue_name
from splitfed.roles.split_common import CLIENT, RELAY, SERVER, SplitSettings
from splitfed.scenarios import split
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import max_param_diff


def frame(session, sender, seq, kind="activations", **tensors) -> bytes:
    return encode(Message(kind, session, sender, seq=seq, meta={"train": True}, tensors=tensors))


def nan_activations(session):
    x = np.ones((4, 64, 2, 2), np.float32)
    x[0, 0, 0, 0] = np.nan
    return frame(session, CLIENT, 1, x=x, y=np.zeros(4, np.int64))


class Meddler(RabbitTransport):
    """A party's real connection that also replays its own frames as an attacker on the wire
    would: every 5th frame twice (a duplicate) and then once more renumbered far ahead."""

    def publish(self, queue, body, *, persistent=False):
        super().publish(queue, body, persistent=persistent)
        message = decode(body)
        if message.seq % 5 == 0 and message.kind != "done":
            super().publish(queue, body)
            message.seq += 1000
            super().publish(queue, encode(message))


@pytest.mark.parametrize("via", ["relay", "direct"])
def test_bad_input_is_rejected_counted_and_harmless(broker_url, session, digits_baseline, tmp_path, via):
    _, baseline_model = digits_baseline
    ok_x, ok_y = np.ones((4, 64, 2, 2), np.float32), np.zeros(4, np.int64)
    attacks = {
        queue_name(session, SERVER): [
            b"garbage bytes", frame(session, CLIENT, 1, x=ok_x, y=ok_y)[:-7],  # truncated body
            frame(session, CLIENT, 1, x=np.ones((4, 64, 3, 3), np.float32), y=ok_y),  # wrong shape
            frame(session, CLIENT, 1, x=ok_x.astype(np.float64), y=ok_y),  # wrong dtype
            nan_activations(session), frame(session, CLIENT, 1, x=ok_x, y=np.full(4, 99, np.int64)),  # labels out of range
            frame("another-session", CLIENT, 1, x=ok_x, y=ok_y), frame(session, "mallory", 1, x=ok_x, y=ok_y),
        ],
        queue_name(session, CLIENT): [
            b"\x00" * 64, frame(session, SERVER, 1, "gradients", g=np.ones((3, 64, 2, 2), np.float32)),  # wrong shape
            frame(session, SERVER, 1, "gradients", g=np.full((32, 64, 2, 2), np.inf, np.float32)),
        ],
    }
    if via == "relay":
        attacks[queue_name(session, RELAY)] = [
            b"\x80\x04garbage", nan_activations(session)[:-3], nan_activations(session),
            frame(session, CLIENT, 1, x=ok_x.astype(np.int16)), frame("another-session", CLIENT, 1, x=ok_x),
            frame(session, "mallory", 1, x=ok_x),
        ]
    with RabbitTransport(broker_url, name="attacker") as attacker:
        for queue, frames in attacks.items():
            attacker.declare(queue)
            for bad in frames:
                attacker.publish(queue, bad)

        settings = SplitSettings(dataset="digits", epochs=1, batch_size=32, session=session, via=via, timeout=60)
        result = split.run_threads(
            settings,
            lambda role: (Meddler if role == CLIENT else RabbitTransport)(broker_url, name=f"{role}-{session}"),
            save_model=tmp_path / "model.safetensors",
        )
    assert max_param_diff(baseline_model, tmp_path / "model.safetensors") <= 1e-5
    assert result["accuracy"] > 0.5

    expected = {
        SERVER: ["malformed", "shape", "dtype", "nonfinite", "value", "session", "sender"],
        CLIENT: ["malformed", "shape", "nonfinite"],
    }
    first_hop = RELAY if via == "relay" else SERVER
    expected[first_hop] = expected.get(first_hop, []) + ["duplicate", "out-of-order"]
    if via == "relay":
        expected[RELAY] += ["malformed", "nonfinite", "dtype", "session", "sender"]
    for role, reasons in expected.items():
        for reason in reasons:
            assert rejected_count(role, session, reason) >= 1, f"{role} did not count a {reason} rejection"
