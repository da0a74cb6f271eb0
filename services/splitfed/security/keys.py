"""ed25519 keys for parties, the key-list file servers trust, and message signatures.

Key-list file (JSON): {"version": 1, "parties": {"worker-0": "<public key, hex>", ...}}
Private keys are PEM (PKCS#8) files readable by their owner only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
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


class KeyList:
    """The parties a receiver trusts, each with its public key."""

    def __init__(self, parties: dict[str, Ed25519PublicKey]):
        self.parties = parties

    def __contains__(self, party: str) -> bool:
        return party in self.parties

    def verify(self, party: str, signature_hex: str | None, data: bytes) -> bool:
        key = self.parties.get(party)
        if key is None or not signature_hex:
            return False
        try:
            key.verify(bytes.fromhex(signature_hex), data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def load(cls, path: Path) -> KeyList:
        try:
            document = json.loads(Path(path).read_text())
            parties = {name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key)) for name, hex_key in document["parties"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyFileError(f"key list {path} is unreadable: {exc!r}") from None
        if not parties:
            raise KeyFileError(f"key list {path} names no parties")
        return cls(parties)


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


def generate(out: Path, parties: list[str], *, force: bool = False) -> Path:
    """Write PARTY.key (private, mode 0600) and PARTY.pub for each party, and the key list.
    Existing keys are kept unless `force`: a new key would lock the party out of its servers."""
    for party in parties:
        if not PARTY_NAME.fullmatch(party):
            raise KeyFileError(f"party name {party[:80]!r} must match {PARTY_NAME.pattern} (it names files in {out})")
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
        listing[party] = public
    key_list = out / KEY_LIST_NAME
    key_list.write_text(json.dumps({"version": 1, "parties": listing}, indent=2) + "\n")
    return key_list
