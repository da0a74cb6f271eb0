"""A genuine signature must not carry a changed message: the body, the round or the metadata
altered after signing is refused as `signature` by the receiving Endpoint (no broker needed)."""

import json
import struct

import numpy as np
import pytest

from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, ProtocolError, encode, encode_body, signed_bytes
from splitfed.protocol.codec import MAGIC
from splitfed.roles.endpoint import Endpoint
from splitfed.security import keys
from splitfed.transport import MemoryBroker, MemoryTransport

SESSION = "sig-unit"
INBOX = "splitfed.sig-unit.fedavg-server"


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    key_list = keys.KeyList.load(keys.generate(folder, ["fedavg-server", "worker-0"]))
    return key_list, keys.load_private(folder / "worker-0.key", "worker-0")


def signed_frame(signer, round_number: int = 2) -> bytes:
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "b": np.ones(3, np.float32)}
    message = Message("update", SESSION, "worker-0", seq=1, round=round_number, meta={"samples": 40, "train_loss": 0.5}, tensors=tensors)
    body = encode_body(message.tensors)
    message.sig = signer.sign(signed_bytes(message, body))
    return encode(message, body)


def with_header(frame: bytes, change) -> bytes:
    """The same frame (same body, same `sig`) with its JSON header edited by `change`."""
    (length,) = struct.unpack(">I", frame[4:8])
    header = json.loads(frame[8 : 8 + length])
    change(header)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + frame[8 + length :]


def with_body_byte_flipped(frame: bytes) -> bytes:
    # The last byte is the low mantissa byte of the last float32: the body stays valid and finite.
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def server_endpoint(key_list) -> Endpoint:
    return Endpoint(MemoryTransport(MemoryBroker()), session=SESSION, role="fedavg-server", inbox=INBOX, trusted=key_list, ordered=False)


def refusal(endpoint: Endpoint, frame: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        endpoint.validate(frame, ("update",), None, None)
    return caught.value.reason


def test_untouched_signed_frame_is_accepted(parties):
    key_list, signer = parties
    message = server_endpoint(key_list).validate(signed_frame(signer), ("update",), None, None)
    assert (message.sender, message.round, message.meta["samples"]) == ("worker-0", 2, 40)


def test_changed_body_with_the_genuine_signature_is_refused(parties):
    key_list, signer = parties
    frame = signed_frame(signer)
    tampered = with_body_byte_flipped(frame)
    assert tampered != frame and tampered[:-1] == frame[:-1]
    assert refusal(server_endpoint(key_list), tampered) == "signature"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda h: h.update(round=3), id="round"),
        pytest.param(lambda h: h["meta"].update(samples=4000), id="meta-samples"),
        pytest.param(lambda h: h.update(seq=2), id="seq"),
    ],
)
def test_changed_header_with_the_genuine_signature_is_refused(parties, change):
    key_list, signer = parties
    frame = signed_frame(signer)
    endpoint = server_endpoint(key_list)
    endpoint.validate(with_header(frame, lambda h: None), ("update",), None, None)  # re-framing alone changes nothing
    assert refusal(endpoint, with_header(frame, change)) == "signature"


def test_receive_counts_the_tampered_frames_and_goes_on_to_the_genuine_one(parties):
    key_list, signer = parties
    broker = MemoryBroker()
    endpoint = Endpoint(MemoryTransport(broker), session=SESSION, role="fedavg-server", inbox=INBOX, trusted=key_list, ordered=False)
    before = rejected_count("fedavg-server", SESSION, "signature")
    genuine = signed_frame(signer, round_number=5)
    sender = MemoryTransport(broker)
    sender.publish(INBOX, with_body_byte_flipped(genuine))
    sender.publish(INBOX, with_header(genuine, lambda h: h.update(round=6)))
    sender.publish(INBOX, genuine)
    message, _ = endpoint.receive(("update",), None, wait=5)
    assert message.round == 5 and np.array_equal(message.tensors["w"], np.arange(12, dtype=np.float32).reshape(3, 4) / 7)
    assert rejected_count("fedavg-server", SESSION, "signature") == before + 2


def test_an_unsigned_body_is_refused_before_it_is_parsed(parties):
    """A frame announcing a million tensors, unsigned: refused as `unsigned` at the cost of a
    hash, with the body never handed to the safetensors parser."""
    from unittest import mock

    from splitfed.protocol import codec

    header = json.dumps({"__metadata__": {}, **{f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(1_000_000)}}).encode()
    body = struct.pack("<Q", len(header)) + header + bytes(4_000_000)
    frame = encode(Message("update", SESSION, "worker-0", seq=1, round=1, meta={"samples": 1}), body)
    key_list, _ = parties
    endpoint = server_endpoint(key_list)
    with mock.patch.object(codec, "st_load", side_effect=AssertionError("the body was parsed")):
        with pytest.raises(ProtocolError, match="unsigned"):
            endpoint.validate(frame, ("update",), None, None)


def test_a_batch_shares_one_body_and_signs_each_message_for_its_recipient(tmp_path, monkeypatch):
    """send_messages serialises a tensors dict shared by the batch once, yet every frame is
    numbered, bound to its recipient and signed on its own: each verifies at its recipient's
    Endpoint, and none passes at another's."""
    from splitfed.roles import endpoint as endpoint_module

    names = ["fedavg-server", "worker-0", "worker-1", "worker-2"]
    key_list = keys.KeyList.load(keys.generate(tmp_path, names))
    broker = MemoryBroker()
    server = Endpoint(MemoryTransport(broker), session=SESSION, role="fedavg-server", inbox=INBOX, signer=keys.load_private(tmp_path / "fedavg-server.key", "fedavg-server"),
                      trusted=key_list, ordered=False)
    server.bind("run-1")
    encoded = []
    monkeypatch.setattr(endpoint_module, "encode_body", lambda tensors: encoded.append(1) or encode_body(tensors))
    tensors = {"w": np.arange(6, dtype=np.float32)}
    workers = names[1:]
    inboxes = {worker: f"splitfed.{SESSION}.fedavg-worker.{worker}" for worker in workers}
    sent = server.send_messages([(inboxes[worker], Message("model", "", "", round=1, tensors=tensors), worker) for worker in workers], persistent=True)
    assert len(encoded) == 1 and len({s.digest for s in sent}) == len(workers)  # one body; three different signed frames
    for worker in workers:
        receiver = Endpoint(MemoryTransport(broker), session=SESSION, role="fedavg-worker", inbox=inboxes[worker], trusted=key_list, ordered=False, name=worker, timeout=30)
        receiver.bind("run-1")
        message, _ = receiver.receive(("model",), ("fedavg-server",))
        assert message.meta["to"] == worker and np.array_equal(message.tensors["w"], tensors["w"])
    # One more batch, and worker-0's frame handed to worker-1 instead: refused, as bound to another.
    server.send_messages([(inboxes["worker-1"], Message("model", "", "", round=2, tensors=tensors), "worker-0")])
    before = rejected_count("fedavg-worker", SESSION, "replay")
    other = Endpoint(MemoryTransport(broker), session=SESSION, role="fedavg-worker", inbox=inboxes["worker-1"], trusted=key_list, ordered=False, name="worker-1", timeout=30)
    other.bind("run-1")
    assert other.receive(("model",), ("fedavg-server",), wait=0.5) is None
    assert rejected_count("fedavg-worker", SESSION, "replay") == before + 1


@pytest.mark.parametrize(
    ("change", "session", "kinds"),
    [
        pytest.param(lambda h: h.update(kind="done"), SESSION, ("update", "done"), id="kind-relabelled"),
        pytest.param(lambda h: h.update(session="sig-unit-other"), "sig-unit-other", ("update",), id="another-session"),
    ],
)
def test_a_signed_frame_cannot_be_relabelled_or_replayed_into_another_session(parties, change, session, kinds):
    """The signature covers kind and session too: a signed update neither passes as another kind
    (a `done`) nor, replayed, in another session whose receiver trusts the same keys."""
    key_list, signer = parties
    endpoint = Endpoint(MemoryTransport(MemoryBroker()), session=session, role="fedavg-server", inbox=INBOX, trusted=key_list, ordered=False)
    with pytest.raises(ProtocolError) as caught:
        endpoint.validate(with_header(signed_frame(signer), change), kinds, None, None)
    assert caught.value.reason == "signature"
