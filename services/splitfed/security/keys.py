"""ed25519 keys for parties, the key-list file servers trust, and message signatures.

Key-list file (JSON):
    {"version": 2, "parties": {"worker-0": {"key": "<public key, hex>", "roles": ["fedavg-worker"],
                                            "max_samples": 60000}, ...}}
`roles`: the roles the party may act as (a split-client's key cannot join as a FedAvg worker);
`max_samples` (optional): the most training samples its updates may claim. Version 1 lists
(`"worker-0": "<hex>"`) name no roles: their keys may act as any role, with a warning.
Private keys are PEM (PKCS#8) files readable by their owner only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_LIST_NAME = "key-list.json"
PARTY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a file name in the key folder, never a path out of it

log = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key or key list cannot be read; the message says which file and why."""


@dataclass
class Signer:
    """Signs what one party sends."""

    party: str
    key: Ed25519PrivateKey

    def sign(self, data: bytes) -> str:
        return self.key.sign(data).hex()

    def public_hex(self) -> str:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# Roles a party's name implies when `generate` is not told: fixed role names, and worker-N.
NAMED_ROLES = ("fedavg-server", "split-client", "split-server", "split-fed", "relay", "p2p-tracker")
WORKER_NAME = re.compile(r"worker-[0-9]+")
SPLIT_CLIENT_NAME = re.compile(r"split-client-[0-9]+")  # one of several split clients
PEER_NAME = re.compile(r"(p2p-peer|smpl-peer)-[0-9]+")  # a decentralized peer: its role is its name's stem


@dataclass(frozen=True)
class Party:
    key: Ed25519PublicKey | bytes  # bytes: checked to be a valid key, parsed on first use (KeyList.public_key)
    roles: frozenset[str] | None  # None: any role (a version 1 key list)
    max_samples: int | None = None


class KeyList:
    """The parties a receiver trusts: each one's public key, roles and sample ceiling."""

    def __init__(self, parties: dict[str, Party]):
        self.parties = parties

    def __contains__(self, party: str) -> bool:
        return party in self.parties

    def allows(self, party: str, roles: Collection[str]) -> bool:
        """Whether `party` may act as one of `roles`."""
        entry = self.parties.get(party)
        return entry is not None and (entry.roles is None or bool(entry.roles & set(roles)))

    def max_samples(self, party: str) -> int | None:
        entry = self.parties.get(party)
        return entry.max_samples if entry else None

    def public_key(self, party: str) -> Ed25519PublicKey | None:
        """The party's key, parsed the first time it is needed: a worker that loads a list of
        1000 parties talks to one of them, and parsing every key (1000 workers each loading the
        list: a million keys) was most of a large run's start-up."""
        entry = self.parties.get(party)
        if entry is None:
            return None
        if isinstance(entry.key, bytes):
            entry = self.parties[party] = Party(Ed25519PublicKey.from_public_bytes(entry.key), entry.roles, entry.max_samples)
        return entry.key

    def verify(self, party: str, signature_hex: str | None, data: bytes) -> bool:
        if party not in self.parties or not signature_hex:
            return False
        try:
            self.public_key(party).verify(bytes.fromhex(signature_hex), data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def load(cls, path: Path) -> KeyList:
        try:
            document = json.loads(Path(path).read_text())
            parties = {name: _party(entry) for name, entry in document["parties"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyFileError(f"key list {path} is unreadable: {exc!r}") from None
        if not parties:
            raise KeyFileError(f"key list {path} names no parties")
        if any(party.roles is None for party in parties.values()):
            log.warning("key list %s names no roles: its keys may act as any role (regenerate it with splitfed keys generate)", path)
        return cls(parties)


def _public_bytes(hex_key: str) -> bytes:
    """A raw ed25519 public key from its hex, checked for length here; the curve point is
    checked when the key is first used (KeyList.public_key)."""
    raw = bytes.fromhex(hex_key)
    if len(raw) != 32:
        raise ValueError(f"an ed25519 public key is 32 bytes, not {len(raw)}")
    return raw


def _party(entry: str | dict) -> Party:
    if isinstance(entry, str):  # version 1: a public key, no roles
        return Party(_public_bytes(entry), None)
    ceiling = entry.get("max_samples")
    if ceiling is not None and (not isinstance(ceiling, int) or isinstance(ceiling, bool) or ceiling < 1):
        raise ValueError(f"max_samples {ceiling!r} is not a positive whole number")
    roles = entry["roles"]
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise ValueError(f"roles {roles!r} is not a list of role names")
    return Party(_public_bytes(entry["key"]), frozenset(roles), ceiling)


def party_roles(spec: str) -> tuple[str, list[str]]:
    """`NAME:ROLE[,ROLE...]`, or a NAME whose role is implied (fedavg-server, worker-N, ...)."""
    name, _, roles = spec.partition(":")
    if not PARTY_NAME.fullmatch(name):
        raise KeyFileError(f"party name {name[:80]!r} must match {PARTY_NAME.pattern} (it names files in the key folder)")
    if roles:
        return name, roles.split(",")
    if name in NAMED_ROLES:
        return name, [name]
    if WORKER_NAME.fullmatch(name):
        return name, ["fedavg-worker"]
    if SPLIT_CLIENT_NAME.fullmatch(name):
        return name, ["split-client"]
    if PEER_NAME.fullmatch(name):
        return name, [name.rsplit("-", 1)[0]]
    raise KeyFileError(f"say which role {name!r} may act as: {name}:ROLE (for example {name}:fedavg-worker)")


def load_private(path: Path, party: str) -> Signer:
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("private key %s can be read by others (mode %o): chmod 600 it", path, stat.S_IMODE(mode))
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"private key {path} is unreadable: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is not an ed25519 key")
    return Signer(party, key)


def generate(out: Path, specs: list[str], *, force: bool = False, max_samples: int | None = None) -> Path:
    """Write PARTY.key (private, mode 0600) and PARTY.pub for each party (`party_roles` specs),
    and the key list naming each one's roles (and, given, the sample ceiling of its updates).
    Existing keys are kept unless `force`: a new key would lock the party out of its servers."""
    roles = dict(party_roles(spec) for spec in specs)
    parties = [party_roles(spec)[0] for spec in specs]
    if len(set(parties)) != len(parties):
        raise KeyFileError("a party is named twice")
    existing = [str(out / f"{party}.key") for party in parties if (out / f"{party}.key").exists()]
    if existing and not force:
        raise KeyFileError(f"{', '.join(existing[:3])} already exist: keep them, or give --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    listing = {}
    for party in parties:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        private_path = out / f"{party}.key"
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public = Signer(party, key).public_hex()
        (out / f"{party}.pub").write_text(public + "\n")
        listing[party] = {"key": public, "roles": roles[party], **({"max_samples": max_samples} if max_samples else {})}
    key_list = out / KEY_LIST_NAME
    key_list.write_text(json.dumps({"version": 2, "parties": listing}, indent=2) + "\n")
    return key_list
