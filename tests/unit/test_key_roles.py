"""Keys bound to roles and to a sample ceiling: a key listed for one role cannot act as another,
and a listed worker cannot claim more samples than its entry allows."""

import json
import logging

import numpy as np
import pytest
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode, encode_body, signed_bytes
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.security import keys
from splitfed.transport import MemoryBroker, MemoryTransport

SETTINGS = FederatedSettings(dataset="digits", model="tiny", rounds=2, partition="iid", lr=0.05)


def test_key_lists_name_roles_and_ceilings(tmp_path, caplog):
    listing = keys.KeyList.load(keys.generate(tmp_path / "a", ["fedavg-server", "worker-0", "split-client", "alice:split-server,relay"], max_samples=500))
    assert listing.allows("worker-0", ["fedavg-worker"]) and not listing.allows("worker-0", ["fedavg-server"])
    assert listing.allows("split-client", ["split-client"]) and not listing.allows("split-client", ["fedavg-worker"])
    assert listing.allows("alice", ["relay"]) and listing.max_samples("worker-0") == 500
    with pytest.raises(keys.KeyFileError, match="say which role 'bob' may act as"):
        keys.generate(tmp_path / "b", ["bob"])
    old = {"version": 1, "parties": {"worker-0": json.loads((tmp_path / "a" / "key-list.json").read_text())["parties"]["worker-0"]["key"]}}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, "splitfed.security.keys"):
        assert keys.KeyList.load(tmp_path / "v1.json").allows("worker-0", ["anything"])
    assert any("names no roles" in record.getMessage() for record in caplog.records)


def signed(message: Message, signer) -> bytes:
    body = encode_body(message.tensors)
    message.sig = signer.sign(signed_bytes(message, body))
    return encode(message, body)


class Overclaimer(MemoryTransport):
    """worker-0 gone greedy: before each real update, a signed copy claiming 5000 samples."""

    signer = None

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "update":
            greedy = Message(message.kind, message.session, message.sender, message.seq, message.round, {**message.meta, "samples": 5000},
                             {name: array * np.float32(3) for name, array in message.tensors.items()})
            super().publish(queue, signed(greedy, self.signer))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_a_key_acts_only_in_its_role_and_claims_no_more_than_its_ceiling(tmp_path):
    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", "worker-0", "worker-1", "worker-2", "split-client"], max_samples=1000)
    broker = MemoryBroker()
    # The split client's key, listed but for split learning, asks to join as a worker.
    split_client = keys.load_private(tmp_path / "keys" / "split-client.key", "split-client")
    join = Message("join", "key-roles", "split-client", seq=1, meta={"samples": 100, "nonce": "1" * 32})
    MemoryTransport(broker).publish("splitfed.key-roles.fedavg-server", signed(join, split_client))

    def connect(party):
        if party != "worker-0":
            return MemoryTransport(broker)
        greedy = Overclaimer(broker)
        greedy.signer = keys.load_private(tmp_path / "keys" / "worker-0.key", "worker-0")
        return greedy

    result = launch.run(fedavg.SCENARIO, SETTINGS, FedAvgRun(session="key-roles", key_list=key_list, checkpoint_dir=tmp_path / "ckpt"), connect_as=connect)
    assert rejected_count("fedavg-server", "key-roles", "role") == 1
    assert rejected_count("fedavg-server", "key-roles", "value") == SETTINGS.rounds  # each greedy copy
    assert result["contributors"] == {"1": ["worker-0", "worker-1", "worker-2"], "2": ["worker-0", "worker-1", "worker-2"]}
    reference, _ = federated.reference_run(SETTINGS)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
