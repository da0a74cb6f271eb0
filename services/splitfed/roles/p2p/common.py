"""What the decentralized roles share: names, queues, message kinds, and the checks of a
membership list and of a party's fingerprint. torch-free (the tracker imports it).

peer    --register{incarnation, started, samples, nonce, fingerprint}--> tracker   (a handshake)
tracker --members{version, started, peers: {name: {incarnation, epoch, samples}}, ref?}--> every live peer
tracker --refused{ref, fingerprint}--> a peer whose fingerprint is not the run's (the first registered peer's)
peer    --heartbeat{incarnation, epoch}--> tracker        every --peer-timeout / 3 seconds
peer    --report{incarnation, epoch, ...}--> tracker       after each epoch (accuracy before and after its last synchronisation, on its test_samples)
peer    --leave{incarnation}--> tracker                    at its end
p2p:    peer --model{incarnation, sync}--> every live peer, --syncs-per-epoch times an epoch;  peer --fetch{nonce}--> peer --model{sync, ref}--> joiner
smpl:   peer --want{loss}--> tracker --hyperedge{edge, members, source}--> members;
        source --start{edge}--> members;  member --delta{edge, samples}--> members
"""

from __future__ import annotations

import math

from splitfed.protocol import ProtocolError
from splitfed.roles.endpoint import queue_name

TRACKER, P2P_PEER, SMPL_PEER = "p2p-tracker", "p2p-peer", "smpl-peer"
REGISTER, HEARTBEAT, REPORT, LEAVE, MEMBERS, REFUSED = "register", "heartbeat", "report", "leave", "members", "refused"
MODEL, FETCH = "model", "fetch"
WANT, HYPEREDGE, START, DELTA = "want", "hyperedge", "start", "delta"
INCARNATION_CHARS = set("0123456789abcdef")
MAX_PEERS = 4096  # a membership list longer than this is refused: it would cost every peer memory and time
FINGERPRINT_FIELDS = {"model", "tensors", "parameters", "classes"}  # as learning.tasks.fingerprint writes it
MAX_CLASSES, MAX_CLASS_NAME = 100_000, 256


def peer_name(role: str, index: int) -> str:
    return f"{role}-{index}"


def tracker_queue(session: str) -> str:
    return queue_name(session, TRACKER)


def peer_queue(session: str, name: str) -> str:
    return queue_name(session, name)


def session_queues(session: str, role: str, peers: int) -> list[str]:
    return [tracker_queue(session), *(peer_queue(session, peer_name(role, index)) for index in range(peers))]


def heartbeat_period(peer_timeout: float) -> float:
    """Three beats fit in the timeout: one lost or late beat does not get a live peer evicted."""
    return peer_timeout / 3


def incarnation_of(meta: dict) -> str:
    """The sender's incarnation (drawn at its start): 32 hex characters, or ProtocolError."""
    incarnation = meta.get("incarnation")
    if not isinstance(incarnation, str) or len(incarnation) != 32 or not set(incarnation) <= INCARNATION_CHARS:
        raise ProtocolError("malformed", "incarnation must be 32 hex characters")
    return incarnation


def count(meta: dict, name: str, low: int = 0) -> int:
    """A non-negative integer field (not a bool), or ProtocolError."""
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProtocolError("malformed", f"{name} must be an integer of at least {low}")
    return value


def fraction(meta: dict, name: str) -> float | None:
    """An optional number in [0, 1] (an accuracy), or ProtocolError."""
    value = meta.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ProtocolError("malformed", f"{name} must be a number in [0, 1]")
    return float(value)


def finite(meta: dict, name: str) -> float | None:
    value = meta.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError("malformed", f"{name} must be a finite number")
    return float(value)


def fingerprint_of(meta: dict) -> dict:
    """The sender's fingerprint of its model and classes (learning.tasks.fingerprint), checked:
    what the parties of a run compare when they meet (split clients and their server, peers at
    the tracker); ProtocolError if it is not one. Torch-free: the tracker checks it too."""
    value = meta.get("fingerprint")
    if not isinstance(value, dict) or set(value) != FINGERPRINT_FIELDS:
        raise ProtocolError("malformed", f"a fingerprint holds {', '.join(sorted(FINGERPRINT_FIELDS))}")
    model, classes = value["model"], value["classes"]
    if not (isinstance(model, str) and 1 <= len(model) <= 64 and set(model) <= INCARNATION_CHARS):
        raise ProtocolError("malformed", "a fingerprint's model is a hex digest")
    count(value, "tensors")
    count(value, "parameters")
    if not (isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES
            and all(isinstance(name, str) and len(name) <= MAX_CLASS_NAME for name in classes)):
        raise ProtocolError("malformed", f"a fingerprint's classes are 1 to {MAX_CLASSES} names of at most {MAX_CLASS_NAME} characters")
    return value


def peer_role(name: str) -> str | None:
    """The role in a peer's name (p2p-peer-3: p2p-peer), None if the name is not ROLE-INDEX."""
    role, _, index = name.rpartition("-")
    return role if role and index.isdigit() else None


def members_of(meta: dict, role: str) -> dict[str, dict]:
    """A membership list's peers, checked: names of `role`, each with its incarnation, epoch and samples."""
    peers = meta.get("peers")
    if not isinstance(peers, dict) or len(peers) > MAX_PEERS:
        raise ProtocolError("malformed", "members lists at most 4096 peers by name")
    for name, entry in peers.items():
        if peer_role(name) != role or not isinstance(entry, dict):
            raise ProtocolError("malformed", f"members names {name[:80]!r}, not a {role}")
        incarnation_of(entry)
        count(entry, "epoch")
        count(entry, "samples", 1)
    return peers
