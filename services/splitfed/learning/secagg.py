"""SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
after Bonawitz et al. 2017): the maths of one round, no I/O. The roles (roles.fedavg) carry it.

Each round's workers (the participants, n) form a k-regular graph: a ring in an order drawn from
the attempt's seed, each worker joined to the k/2 before and after it (k = n - 1: every pair, as
the original SecAgg). A worker u
1. draws two X25519 key pairs: c for sealing messages to a neighbour, s for agreeing on masks;
2. splits a fresh 16-byte self-mask seed b_u and its s secret key into Shamir shares (threshold t
   among its neighbours, pycryptodome's GF(2^128) scheme) and seals each neighbour's pair of
   shares with a key agreed from c (HKDF-SHA256, ChaCha20-Poly1305, bound to run, round, attempt,
   sender and recipient): the server forwards what it cannot open;
3. sends its input x_u, a vector over Z_2^32, masked:
       y_u = x_u + PRG(b_u) + sum over neighbours v that shared: (+1 if u < v else -1) PRG(s_uv)
   where s_uv is agreed from u's s key and v's (X25519, HKDF) and PRG is ChaCha20's keystream;
4. once the server names the survivors (who sent y) and the dropped (who shared but sent no y), it
   reveals, for each neighbour, the share of b_v if v survived or of v's s key if v dropped, and
   never both for one v, so the server never holds both unmasking secrets of anyone.
The pairwise masks of two survivors cancel in the sum; the server removes each survivor's
PRG(b_u) and, from a dropped worker's reconstructed s key, the masks its surviving neighbours
added for it. t > k/2 of a worker's neighbours must reveal: fewer could not outvote the other half.

Inputs (`Encoding`): a worker's model change, each coordinate clipped to [-clip, clip], weighted
by samples / max_samples and rounded to a multiple of step = clip / L, L = (2^31 - 1) // n, so
the sum of n inputs cannot wrap; then its mean training loss (scaled into the same range, same
weight), whether its change was under the DP clip (adaptive clipping counts them), and its
sample count, exactly. The server learns the weighted sums and the total samples, nothing per worker.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FIELD_BITS = 32
LOSS_CAP = 100.0  # a worker's mean loss above this counts as this in the round's mean
EXTRA = 3  # coordinates after the model change: loss, under-the-clip, samples
SEED_BYTES = 16  # Shamir's block in pycryptodome
KEY_BYTES = 32  # X25519 public and private keys
SEALED_BYTES = 12 + 1 + SEED_BYTES + KEY_BYTES + 16  # nonce, share index, b share, s key shares, tag


class SecAggError(ValueError):
    """A round that cannot go on: the message says why (too few neighbours, a share that does not open)."""


# -- the graph --------------------------------------------------------------------------------

def neighbourhoods(participants: list[str], k: int, seed: bytes) -> dict[str, list[str]]:
    """Each participant's k neighbours (sorted): a ring in the order `seed` draws, k/2 on each side;
    k >= n - 1: every other participant."""
    order = sorted(participants)
    if k >= len(order) - 1:
        return {u: [v for v in order if v != u] for u in order}
    random.Random(seed).shuffle(order)
    n, half = len(order), k // 2
    return {order[i]: sorted(order[(i + j) % n] for j in (*range(-half, 0), *range(1, half + 1))) for i in range(n)}


def graph_seed(run: str, round_number: int) -> bytes:
    """The ring order of a round: the same for every attempt at it, so a server that runs a round
    again cannot draw another graph until a worker's neighbours suit it."""
    return hashlib.sha256(f"splitfed-secagg/{run}/{round_number}".encode()).digest()


# -- primitives -------------------------------------------------------------------------------

def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: X25519, then HKDF-SHA256 over `info`; SecAggError for a
    public key no exchange can use (a low-order point gives an all-zero secret, which X25519 refuses)."""
    try:
        return _hkdf(private.exchange(X25519PublicKey.from_public_bytes(public)), info)
    except ValueError:
        raise SecAggError("a public key is not one an X25519 exchange can use (a low-order point)") from None


def usable_public_key(public: bytes) -> bool:
    """Whether an advertised key can take part in an exchange: checked once, by the server, before
    anyone relies on it."""
    try:
        agree(X25519PrivateKey.generate(), public, b"splitfed-secagg/check")
    except SecAggError:
        return False
    return True


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uint32 from ChaCha20's keystream under a key derived from `seed`."""
    encryptor = Cipher(algorithms.ChaCha20(_hkdf(seed, b"splitfed-secagg/prg"), bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def share(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares 1..count of `secret` (a multiple of 16 bytes), any `threshold` of which give it back."""
    blocks = [Shamir.split(threshold, count, secret[i : i + SEED_BYTES], ssss=False) for i in range(0, len(secret), SEED_BYTES)]
    return [b"".join(block[index][1] for block in blocks) for index in range(count)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from shares by their index (1-based); as many as its threshold."""
    width = len(next(iter(shares.values())))
    return b"".join(
        Shamir.combine([(index, value[i : i + SEED_BYTES]) for index, value in shares.items()], ssss=False) for i in range(0, width, SEED_BYTES)
    )


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """The plaintext; SecAggError when it was not sealed with this key for this context."""
    from cryptography.exceptions import InvalidTag

    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], context)
    except (InvalidTag, ValueError):
        raise SecAggError("a sealed share does not open: forged, tampered with or meant for another") from None


def commitment(context: str, party: str, seed: bytes) -> bytes:
    return hashlib.sha256(f"{context}/seed/{party}/".encode() + seed).digest()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _pair_info(context: str, u: str, v: str) -> bytes:
    low, high = sorted((u, v))
    return f"{context}/mask/{low}/{high}".encode()


def _seal_info(context: str, sender: str, recipient: str) -> bytes:
    """What a sealed box's key is derived over and its tag covers: it opens for this pair, this way, in this attempt only."""
    return f"{context}/shares/{sender}/{recipient}".encode()


def pair_mask(private: X25519PrivateKey, public: bytes, context: str, u: str, v: str, length: int) -> np.ndarray:
    """The mask u adds for neighbour v: +PRG(s_uv) when u < v, its negative otherwise."""
    mask = prg(agree(private, public, _pair_info(context, u, v)), length)
    return mask if u < v else (-mask.astype(np.int64)).astype(np.uint32)  # negation in Z_2^32


# -- inputs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """How a worker's update becomes a vector over Z_2^32 and the sum of `participants` of them
    comes back (see the module docstring)."""

    clip: float
    max_samples: int
    participants: int

    @property
    def levels(self) -> int:
        return (2**31 - 1) // self.participants

    @property
    def step(self) -> float:
        return self.clip / self.levels

    def encode(self, delta: np.ndarray, loss: float, samples: int, under_clip: bool) -> np.ndarray:
        """(P,) float model change -> (P + EXTRA,) uint32."""
        if not 0 < samples <= self.max_samples:
            raise SecAggError(f"{samples} samples: at most {self.max_samples} (--secagg-max-samples)")
        if not np.isfinite(delta).all() or not np.isfinite(loss):
            raise SecAggError("the model change or the loss is not finite: there is nothing to add up")
        weight = samples / self.max_samples
        values = np.empty(delta.size + 1, dtype=np.float64)
        values[:-1] = np.clip(delta.astype(np.float64).reshape(-1), -self.clip, self.clip)
        values[-1] = self.clip * min(max(float(loss), 0.0), LOSS_CAP) / LOSS_CAP
        quantised = np.rint(values * weight / self.step).astype(np.int64)
        return np.concatenate([quantised, [int(under_clip), samples]]).astype(np.uint32)  # negatives wrap: two's complement

    def decode(self, total: np.ndarray, contributors: int) -> Aggregate:
        """The unmasked sum of `contributors`' inputs -> their sample-weighted means; SecAggError
        for a sum whose sample count they cannot have (a worker lied about its own)."""
        signed = total.astype(np.int64)
        signed[: -EXTRA + 1] = np.where(signed[: -EXTRA + 1] >= 2**31, signed[: -EXTRA + 1] - 2**32, signed[: -EXTRA + 1])
        samples, under_clip = int(signed[-1]), int(signed[-2])
        if not contributors <= samples <= contributors * self.max_samples or not 0 <= under_clip <= contributors:
            raise SecAggError(f"the unmasked sum of {contributors} inputs counts {samples} samples and {under_clip} updates under the clip: "
                              f"not what {contributors} workers of 1 to {self.max_samples} samples can send")
        scale = self.step * self.max_samples / samples
        return Aggregate(signed[:-EXTRA] * scale, float(signed[-EXTRA] * scale * LOSS_CAP / self.clip), under_clip, samples)

    def bound(self, contributors: int, samples: int) -> float:
        """The largest error of a coordinate of the decoded mean against the exact weighted mean of
        the clipped changes: each input rounds by at most step/2."""
        return contributors * self.step * self.max_samples / (2 * samples)


@dataclass
class Aggregate:
    mean_delta: np.ndarray  # (P,) float64: the sample-weighted mean model change
    mean_loss: float
    under_clip: int  # how many contributors' changes were under the DP clip
    samples: int


def plain_sum(inputs: list[np.ndarray]) -> np.ndarray:
    """The sum over Z_2^32 of unmasked inputs: what the masked ones must add up to once unmasked."""
    total = np.zeros_like(inputs[0])
    for vector in inputs:
        total += vector  # uint32 wraps: arithmetic mod 2^32
    return total


# -- one worker's part ------------------------------------------------------------------------

@dataclass
class HeldShares:
    """What a worker holds of a neighbour's secrets: its index among the neighbour's shares, the
    share of the self-mask seed and the share of the mask key."""

    index: int
    seed: bytes
    key: bytes


class MaskingParty:
    """One worker's state in one attempt of one round: its keys, its secrets, the shares it holds."""

    def __init__(self, name: str, context: str, neighbours: list[str], threshold: int):
        self.name, self.context, self.neighbours, self.threshold = name, context, neighbours, threshold
        self.cipher_key, self.mask_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.self_seed = os.urandom(SEED_BYTES)
        self.keys: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (cipher public, mask public), as advertised
        self.held: dict[str, HeldShares] = {}  # neighbour -> its shares to this worker
        self.revealed = False

    def advertisement(self) -> tuple[bytes, bytes, bytes]:
        """Its two public keys and a commitment to its self-mask seed (the server checks the seed it rebuilds)."""
        return public_bytes(self.cipher_key), public_bytes(self.mask_key), commitment(self.context, self.name, self.self_seed)

    def sealed_shares(self, keys: dict[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Given its advertised neighbours' public keys, the sealed shares for each of them."""
        if unknown := set(keys) - set(self.neighbours):
            raise SecAggError(f"keys of {sorted(unknown)[:3]}, which are not {self.name}'s neighbours")
        if len(keys) < self.threshold:
            raise SecAggError(f"{len(keys)} of {self.name}'s neighbours advertised keys, fewer than the threshold {self.threshold}")
        self.keys = dict(sorted(keys.items()))
        seed_shares = share(self.self_seed, self.threshold, len(self.keys))
        key_shares = share(private_bytes(self.mask_key), self.threshold, len(self.keys))
        return {
            v: seal(agree(self.cipher_key, cipher, _seal_info(self.context, self.name, v)),
                    bytes([i + 1]) + seed_shares[i] + key_shares[i], _seal_info(self.context, self.name, v))
            for i, (v, (cipher, _)) in enumerate(self.keys.items())
        }

    def masked(self, vector: np.ndarray, sealed: dict[str, bytes]) -> np.ndarray:
        """Its input masked: the self mask, and a pairwise mask for each neighbour whose shares it
        received (those, and only those, mask with it too)."""
        held = {}
        for u, box in sealed.items():
            if u not in self.keys:
                raise SecAggError(f"shares from {u!r}, which advertised no keys to {self.name}")
            plain = unseal(agree(self.cipher_key, self.keys[u][0], _seal_info(self.context, u, self.name)),
                           box, _seal_info(self.context, u, self.name))
            if len(plain) != 1 + SEED_BYTES + KEY_BYTES or not 1 <= plain[0] <= len(self.neighbours):
                raise SecAggError(f"shares from {u!r} are not of the expected form")
            held[u] = HeldShares(plain[0], plain[1 : 1 + SEED_BYTES], plain[1 + SEED_BYTES :])
        if len(held) < self.threshold:
            raise SecAggError(f"{len(held)} neighbours shared with {self.name}, fewer than the threshold {self.threshold}")
        self.held = held  # only once every box opened: what it holds is what it masked for
        masked = vector + prg(self.self_seed, vector.size)
        for v in self.held:
            masked += pair_mask(self.mask_key, self.keys[v][1], self.context, self.name, v, vector.size)
        return masked

    def reveal(self, survivors: set[str], dropped: set[str]) -> tuple[dict[str, HeldShares], dict[str, HeldShares]]:
        """For its neighbours: the self-mask seed share of each survivor, the mask key share of each
        dropped one; never both for one neighbour, and once per attempt."""
        if survivors & dropped:
            raise SecAggError(f"asked to reveal both secrets of {sorted(survivors & dropped)[:3]}")
        if self.name not in survivors:
            raise SecAggError(f"{self.name} is not among the survivors it is asked to unmask")
        if self.revealed:
            raise SecAggError(f"{self.name} revealed its shares for this attempt already")
        if unknown := (survivors | dropped) & set(self.neighbours) - set(self.held) - {self.name}:
            raise SecAggError(f"asked about {sorted(unknown)[:3]}, whose shares {self.name} never received")
        self.revealed = True
        return ({v: held for v, held in self.held.items() if v in survivors}, {v: held for v, held in self.held.items() if v in dropped})


# -- the server's part ------------------------------------------------------------------------

def unmask(total: np.ndarray, survivors: list[str], dropped: list[str], neighbours: dict[str, list[str]], mask_keys: dict[str, bytes],
           commitments: dict[str, bytes], seed_shares: dict[str, dict[int, bytes]], key_shares: dict[str, dict[int, bytes]], threshold: int, context: str) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked ones: each survivor's self mask
    rebuilt from its seed's shares, and for each dropped worker (it shared, then sent no input) its
    mask key rebuilt from shares and the masks its surviving neighbours added for it taken out.
    `mask_keys`, `commitments`: every sharer's advertised mask public key and seed commitment. SecAggError naming a worker with fewer
    than `threshold` shares revealed."""
    total = total.copy()
    for u in survivors:
        if len(seed_shares.get(u, {})) < threshold:
            raise SecAggError(f"{len(seed_shares.get(u, {}))} of {u}'s neighbours revealed its self-mask share, fewer than the threshold {threshold}")
        seed = combine(dict(list(seed_shares[u].items())[:threshold]))
        if commitment(context, u, seed) != commitments[u]:
            raise SecAggError(f"{u}'s self-mask seed rebuilt from its neighbours' shares is not the one it committed to: a share was wrong")
        total -= prg(seed, total.size)
    alive = set(survivors)
    for u in dropped:
        if len(key_shares.get(u, {})) < threshold:
            raise SecAggError(f"{u} dropped after sharing and {len(key_shares.get(u, {}))} of its neighbours revealed its key share, fewer than the threshold {threshold}")
        key = X25519PrivateKey.from_private_bytes(combine(dict(list(key_shares[u].items())[:threshold])))
        if public_bytes(key) != mask_keys[u]:
            raise SecAggError(f"{u}'s mask key rebuilt from its neighbours' shares is not the key it advertised: a share was wrong")
        for v in neighbours[u]:
            if v in alive:  # v added -pair_mask(u's view) = pair_mask(v's view) for u: take it out
                total -= pair_mask(key, mask_keys[v], context, v, u, total.size)
    return total
