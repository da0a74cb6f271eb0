"""Secure aggregation on the wire: what the FedAvg server and a worker hold and check in one attempt
of a SecAgg+ round (learning.secagg has the maths). Every message is signed, bound to run and
recipient by the endpoint, and names its round and attempt; one of another attempt is stale.

server --model{round, secure{attempt, participants, neighbours k, threshold t, clip, max_samples}}--> each participant
worker --secagg-keys{attempt, cipher, mask, commitment [, signature]}--> server          (U1: who advertised)
server --secagg-neighbours{attempt, <v>/cipher, <v>/mask, <v>/commitment [, <v>/signature]}--> each of U1, its neighbours in U1
worker --secagg-shares{attempt, <v>: sealed shares}--> server                              (U2: who shared)
server --secagg-sealed{attempt, <u>: sealed shares}--> each of U2, the boxes sealed for it
worker --secagg-masked{attempt, masked, uint32 (P + 3)}--> server                        (U3: who sent an input)
server --secagg-unmask{attempt, survivors U3, dropped U2 - U3}--> each of U3
worker --secagg-consent{attempt [, signature]}--> server                                 (it signs the two lists)
server --secagg-consents{attempt, <u>: signature}--> each that consented, every consent
worker --secagg-reveal{attempt, seed/<v> for survivors, key/<v> for the dropped}--> server

With a key list, a worker signs its advertisement with its own key (over run, round, attempt, name
and the three values); the server and its neighbours check it, so a server cannot slip in keys of
its own, and only parties the key list allows as workers take part. Before it reveals anything a
worker checks that at least t survivors signed the very survivors and dropped lists it was sent
(Bonawitz et al.'s consistency check): a server cannot tell one worker that a neighbour survived
and another that it dropped, and so gather both secrets of anyone. The round's graph is drawn
from the run and the round, the same in every attempt, and a worker reveals shares of a round only
for the survivors it revealed for before: with t > k/2 of every worker's neighbours bound to
one survivor set, a round run again cannot give a second, different sum.
Without a key list nothing is signed and these checks guard only against a server that follows
the protocol (honest but curious).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass, field

import numpy as np

from splitfed.learning import secagg
from splitfed.learning.secagg import EXTRA, KEY_BYTES, SEALED_BYTES, SEED_BYTES, Encoding, MaskingParty, SecAggError
from splitfed.learning.settings import PartitionSettings
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.fedavg.common import CONSENT, CONSENTS, KEYS, MASKED, NEIGHBOURS, REVEAL, SEALED, SERVER, SHARES, UNMASK, WORKER, WORKER_ID
from splitfed.security.keys import KeyList, Signer

SECURE = "secure"  # a model message's meta entry: the attempt's parameters
ATTEMPT = re.compile(r"[0-9a-f]{32}")
SIGNATURE_BYTES = 64
ADVERT = {"cipher": TensorSpec("uint8", (KEY_BYTES,)), "mask": TensorSpec("uint8", (KEY_BYTES,)), "commitment": TensorSpec("uint8", (32,))}
SIGNATURE = {"signature": TensorSpec("uint8", (SIGNATURE_BYTES,))}
SEED_SHARE, KEY_SHARE = TensorSpec("uint8", (1 + SEED_BYTES,)), TensorSpec("uint8", (1 + KEY_BYTES,))


def advert_statement(run: str, round_number: int, attempt: str, worker: str, advert: dict[str, np.ndarray]) -> bytes:
    """What a worker signs of its advertisement."""
    return f"splitfed-secagg-keys/{run}/{round_number}/{attempt}/{worker}/".encode() + b"".join(advert[name].tobytes() for name in ADVERT)


def consent_statement(run: str, round_number: int, attempt: str, survivors: list[str], dropped: list[str]) -> bytes:
    """What a survivor signs before any share is revealed: the lists the server sent it."""
    return json.dumps(["splitfed-secagg-consent", run, round_number, attempt, survivors, dropped]).encode()


def masked_spec(parameters: int) -> dict[str, TensorSpec]:
    return {"masked": TensorSpec("uint32", (parameters + EXTRA,))}


def _bytes(array: np.ndarray) -> bytes:
    return array.tobytes()


def _array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


@dataclass
class RoundConfig:
    """An attempt's parameters, as the model message states them."""

    attempt: str
    participants: list[str]
    neighbours: int
    threshold: int
    clip: float
    max_samples: int

    def meta(self) -> dict:
        return {"attempt": self.attempt, "participants": self.participants, "neighbours": self.neighbours, "threshold": self.threshold,
                "clip": self.clip, "max_samples": self.max_samples}

    def encoding(self, weighted: bool) -> Encoding:
        """`weighted` False (central or local DP): every worker weighs 1, its samples are not used."""
        return Encoding(self.clip, self.max_samples if weighted else 1, len(self.participants))

    @classmethod
    def received(cls, meta: object, worker: str, settings: PartitionSettings, trusted: KeyList | None) -> RoundConfig:
        """The parameters a model message states, checked against what this worker will take part
        in (with a key list, every participant one it allows as a worker); ProtocolError("value")
        for anything else."""
        if not isinstance(meta, dict) or set(meta) != {"attempt", "participants", "neighbours", "threshold", "clip", "max_samples"}:
            raise ProtocolError("value", f"secure aggregation parameters {meta!r:.80}")
        attempt, participants, k, t = meta["attempt"], meta["participants"], meta["neighbours"], meta["threshold"]
        if not isinstance(attempt, str) or not ATTEMPT.fullmatch(attempt):
            raise ProtocolError("value", f"secure aggregation attempt {attempt!r:.40}")
        if (not isinstance(participants, list) or not all(isinstance(p, str) and WORKER_ID.fullmatch(p) for p in participants)
                or participants != sorted(set(participants)) or worker not in participants):
            raise ProtocolError("value", "secure aggregation participants are not a sorted list of workers naming this one")
        if SERVER in participants or trusted is not None and not all(trusted.allows(p, (WORKER,)) for p in participants):
            raise ProtocolError("value", "secure aggregation participants name a party the key list does not allow as a worker")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, t)) or not (k / 2 < t <= k <= len(participants) - 1):
            raise ProtocolError("value", f"secure aggregation with k={k!r:.20}, t={t!r:.20} among {len(participants)}: t must be above k/2 "
                                         "(or the server could gather both secrets of a worker) and k below the participants")
        if meta["clip"] != settings.secagg_clip or meta["max_samples"] != settings.secagg_max_samples:
            raise ProtocolError("value", f"the server encodes with clip {meta['clip']!r:.20} and max_samples {meta['max_samples']!r:.20}, this "
                                         f"worker with {settings.secagg_clip} and {settings.secagg_max_samples}")
        return cls(attempt, participants, k, t, float(meta["clip"]), meta["max_samples"])


# -- the server's side --------------------------------------------------------------------------

@dataclass
class SecureRound:
    """One attempt at a round's secure sum, on the server: who got how far, and what they sent."""

    run: str
    round: int
    config: RoundConfig
    parameters: int  # P: the model's values (the input has P + EXTRA)
    adverts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # U1
    boxes: dict[str, dict[str, bytes]] = field(default_factory=dict)  # U2: sharer -> recipient -> sealed
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # U3
    consents: dict[str, np.ndarray] = field(default_factory=dict)  # survivor -> its signature of the lists (empty without a key list)
    seed_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    key_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    revealed: set[str] = field(default_factory=set)
    held: list = field(default_factory=list)  # the masked inputs' deliveries, acked once the round is on disk or the attempt given up
    trusted: KeyList | None = field(default=None, repr=False)

    @classmethod
    def start(cls, run: str, round_number: int, participants: list[str], k: int, t: int, settings: PartitionSettings, parameters: int,
              trusted: KeyList | None) -> SecureRound:
        config = RoundConfig(uuid.uuid4().hex, sorted(participants), k, t, settings.secagg_clip, settings.secagg_max_samples)
        return cls(run, round_number, config, parameters, trusted=trusted)

    @property
    def context(self) -> str:
        return f"{self.run}/{self.round}/{self.config.attempt}"

    @functools.cached_property
    def graph(self) -> dict[str, list[str]]:
        return secagg.neighbourhoods(self.config.participants, self.config.neighbours, secagg.graph_seed(self.run, self.round))

    def expected(self, kind: str) -> set[str]:
        """Who may send `kind` now."""
        return {KEYS: set(self.config.participants), SHARES: set(self.adverts), MASKED: set(self.boxes), CONSENT: set(self.masked),
                REVEAL: set(self.consents)}[kind]

    def check(self, message: Message) -> None:
        """A protocol message of this attempt, from a worker at this stage, of the form its stage
        says; ProtocolError (stale: another attempt or round) otherwise."""
        sender = message.sender
        if message.round != self.round or message.meta.get("attempt") != self.config.attempt:
            raise ProtocolError("stale", f"{message.kind} from {sender} for round {message.round}, attempt {str(message.meta.get('attempt'))[:32]}: "
                                         f"this is round {self.round}, attempt {self.config.attempt}")
        if sender not in self.expected(message.kind):
            raise ProtocolError("sender", f"{message.kind} from {sender}, which is not at that stage of round {self.round}'s secure sum")
        neighbours = self.graph[sender]
        if message.kind == KEYS:
            check_tensors(message, {**ADVERT, **(SIGNATURE if self.trusted is not None else {})})
            if not all(secagg.usable_public_key(_bytes(message.tensors[name])) for name in ("cipher", "mask")):
                raise ProtocolError("value", f"keys from {sender} that no X25519 exchange can use")
            if self.trusted is not None and not self.trusted.verify(sender, _bytes(message.tensors["signature"]).hex(), advert_statement(
                    self.run, self.round, self.config.attempt, sender, message.tensors)):
                raise ProtocolError("signature", f"keys from {sender} are not signed by {sender}")
        elif message.kind == SHARES:
            check_tensors(message, {v: TensorSpec("uint8", (SEALED_BYTES,)) for v in neighbours if v in self.adverts})
        elif message.kind == MASKED:
            check_tensors(message, masked_spec(self.parameters))
        elif message.kind == CONSENT:
            check_tensors(message, SIGNATURE if self.trusted is not None else {})
            if self.trusted is not None and not self.trusted.verify(sender, _bytes(message.tensors["signature"]).hex(), self.statement()):
                raise ProtocolError("signature", f"the consent of {sender} is not its signature of the survivors and dropped it was sent")
        elif message.kind == REVEAL:
            survivors, dropped = self.unmask_sets()
            check_tensors(message, {**{f"seed/{v}": SEED_SHARE for v in neighbours if v in survivors and sender in self.boxes[v]},
                                    **{f"key/{v}": KEY_SHARE for v in neighbours if v in dropped and sender in self.boxes[v]}})
            for name, array in message.tensors.items():
                owner = name.split("/", 1)[1]
                if int(array[0]) != self.share_index(owner, sender):  # each holder has its own: one could overwrite another's
                    raise ProtocolError("value", f"reveal from {sender} gives {owner}'s share {int(array[0])}, but it holds share {self.share_index(owner, sender)}")

    def take(self, message: Message) -> None:
        """Record a checked protocol message."""
        sender, tensors = message.sender, message.tensors
        if message.kind == KEYS:
            self.adverts[sender] = {name: array.copy() for name, array in tensors.items()}
        elif message.kind == SHARES:
            self.boxes[sender] = {v: _bytes(array) for v, array in tensors.items()}
        elif message.kind == MASKED:
            self.masked[sender] = tensors["masked"].copy()
        elif message.kind == CONSENT:
            self.consents[sender] = tensors.get("signature", np.zeros(0, np.uint8))
        elif message.kind == REVEAL:
            for name, array in tensors.items():
                which, owner = name.split("/", 1)
                (self.seed_shares if which == "seed" else self.key_shares).setdefault(owner, {})[int(array[0])] = _bytes(array[1:])
            self.revealed.add(sender)

    def neighbour_keys(self, worker: str) -> dict[str, np.ndarray]:
        """What `worker` is sent of its neighbours that advertised: their keys, commitments and signatures."""
        return {f"{v}/{name}": array for v in self.graph[worker] if v in self.adverts for name, array in self.adverts[v].items()}

    def share_index(self, owner: str, holder: str) -> int:
        """Which of `owner`'s shares `holder` got: owners number their advertised neighbours in name order."""
        return sorted(v for v in self.graph[owner] if v in self.adverts).index(holder) + 1

    def statement(self) -> bytes:
        return consent_statement(self.run, self.round, self.config.attempt, *self.unmask_sets())

    def sealed_for(self, worker: str) -> dict[str, np.ndarray]:
        return {u: _array(boxes[worker]) for u, boxes in self.boxes.items() if worker in boxes}

    def unmask_sets(self) -> tuple[list[str], list[str]]:
        """(survivors: who sent an input, dropped: who shared but sent none)."""
        return sorted(self.masked), sorted(set(self.boxes) - set(self.masked))

    def unmasked_sum(self) -> np.ndarray:
        """The survivors' inputs added up; SecAggError when too few neighbours revealed."""
        survivors, dropped = self.unmask_sets()
        total = secagg.plain_sum([self.masked[u] for u in survivors])
        adverts = {u: self.adverts[u] for u in self.boxes}
        return secagg.unmask(total, survivors, dropped, self.graph, {u: _bytes(a["mask"]) for u, a in adverts.items()},
                             {u: _bytes(a["commitment"]) for u, a in adverts.items()}, self.seed_shares, self.key_shares,
                             self.config.threshold, self.context)


# -- a worker's side ----------------------------------------------------------------------------

@dataclass
class SecureTurn:
    """A worker's part in one attempt: its masking secrets, and its input once it has trained."""

    run: str
    round: int
    config: RoundConfig
    party: MaskingParty
    input: np.ndarray | None = None
    answered: set[str] = field(default_factory=set)  # the server's requests answered in this attempt: each once
    lists: tuple[list[str], list[str]] | None = None  # the survivors and dropped this worker consented to

    @classmethod
    def start(cls, run: str, round_number: int, config: RoundConfig, worker: str) -> SecureTurn:
        context = f"{run}/{round_number}/{config.attempt}"
        graph = secagg.neighbourhoods(config.participants, config.neighbours, secagg.graph_seed(run, round_number))
        return cls(run, round_number, config, MaskingParty(worker, context, graph[worker], config.threshold))

    def advertisement(self, signer: Signer | None) -> dict[str, np.ndarray]:
        cipher, mask, commitment = self.party.advertisement()
        advert = {"cipher": _array(cipher), "mask": _array(mask), "commitment": _array(commitment)}
        if signer is not None:
            statement = advert_statement(self.run, self.round, self.config.attempt, self.party.name, advert)
            advert["signature"] = _array(bytes.fromhex(signer.sign(statement)))
        return advert

    def check(self, message: Message, trusted: KeyList | None) -> None:
        """A server message of this attempt, of the form its stage says."""
        if message.round != self.round or message.meta.get("attempt") != self.config.attempt:
            raise ProtocolError("stale", f"{message.kind} for round {message.round}, attempt {str(message.meta.get('attempt'))[:32]}, "
                                         f"not this worker's round {self.round}, attempt {self.config.attempt}")
        if message.kind in self.answered:
            raise ProtocolError("duplicate", f"{message.kind} of attempt {self.config.attempt} again: this worker answered it")
        before = {NEIGHBOURS: None, SEALED: NEIGHBOURS, UNMASK: SEALED, CONSENTS: UNMASK}[message.kind]
        if before is not None and before not in self.answered or message.kind == SEALED and self.input is None:
            raise ProtocolError("out-of-order", f"{message.kind} before this worker answered {before}")
        neighbours = self.party.neighbours
        if message.kind == NEIGHBOURS:
            named = {name.rsplit("/", 1)[0] for name in message.tensors}
            check_tensors(message, {f"{v}/{name}": spec for v in neighbours if v in named
                                    for name, spec in {**ADVERT, **(SIGNATURE if trusted is not None else {})}.items()})
            if trusted is not None:
                for v in named:
                    advert = {name: message.tensors[f"{v}/{name}"] for name in ADVERT}
                    statement = advert_statement(self.run, self.round, self.config.attempt, v, advert)
                    if not trusted.verify(v, message.tensors[f"{v}/signature"].tobytes().hex(), statement):
                        raise ProtocolError("signature", f"the keys the server forwards as {v}'s are not signed by {v}")
        elif message.kind == SEALED:
            check_tensors(message, {u: TensorSpec("uint8", (SEALED_BYTES,)) for u in neighbours if u in message.tensors})
        elif message.kind == UNMASK:
            survivors, dropped = message.meta.get("survivors"), message.meta.get("dropped")
            if not all(isinstance(names, list) and names == sorted(set(names)) and set(names) <= set(self.config.participants)
                       for names in (survivors, dropped)):
                raise ProtocolError("value", "unmask request without sorted lists of participants that survived and dropped")
            if set(survivors) & set(dropped) or self.party.name not in survivors:
                raise ProtocolError("value", "unmask request that names a worker both survived and dropped, or not this one among the survivors")
            if missing := set(self.party.held) - set(survivors) - set(dropped):
                raise ProtocolError("value", f"unmask request that leaves out {sorted(missing)[:3]}, which shared with this worker")
            check_tensors(message, {})
        elif message.kind == CONSENTS:
            self.check_consents(message, trusted)

    def check_consents(self, message: Message, trusted: KeyList | None) -> None:
        """At least t survivors (this one among them) consented to the very lists this worker did:
        with a key list, each by its own signature of them."""
        survivors, dropped = self.lists
        check_tensors(message, {u: SIGNATURE["signature"] for u in message.tensors} if trusted is not None else {u: TensorSpec("uint8", (0,)) for u in message.tensors})
        if not set(message.tensors) <= set(survivors) or self.party.name not in message.tensors:
            raise ProtocolError("value", "consents of workers that are not survivors, or without this worker's own")
        if len(message.tensors) < self.config.threshold:
            raise ProtocolError("value", f"{len(message.tensors)} survivors consented, fewer than the threshold {self.config.threshold}")
        if trusted is None:
            return
        # t signatures of these very lists suffice: checking every one would cost each worker n, the round n^2.
        statement, valid = consent_statement(self.run, self.round, self.config.attempt, survivors, dropped), 0
        for u, signature in message.tensors.items():
            if trusted.verify(u, _bytes(signature).hex(), statement):
                valid += 1
                if valid == self.config.threshold:
                    return
        raise ProtocolError("signature", f"fewer than {self.config.threshold} consents forwarded by the server are their workers' signatures "
                                         "of the lists this worker was sent")

    def shares(self, message: Message) -> dict[str, np.ndarray]:
        """The sealed shares for the neighbours whose keys `message` forwards."""
        keys = {v: (_bytes(message.tensors[f"{v}/cipher"]), _bytes(message.tensors[f"{v}/mask"]))
                for v in {name.rsplit("/", 1)[0] for name in message.tensors}}
        return {v: _array(box) for v, box in self.party.sealed_shares(keys).items()}

    def masked(self, message: Message) -> dict[str, np.ndarray]:
        assert self.input is not None, "masked before the input was encoded"
        return {"masked": self.party.masked(self.input, {u: _bytes(box) for u, box in message.tensors.items()})}

    def consent(self, message: Message, signer: Signer | None) -> dict[str, np.ndarray]:
        """This worker's signature of the lists an unmask request names (none without a key)."""
        self.lists = (message.meta["survivors"], message.meta["dropped"])
        if signer is None:
            return {}
        return {"signature": _array(bytes.fromhex(signer.sign(consent_statement(self.run, self.round, self.config.attempt, *self.lists))))}

    def reveal(self) -> dict[str, np.ndarray]:
        survivors, dropped = self.lists
        seeds, keys = self.party.reveal(set(survivors), set(dropped))
        return {**{f"seed/{v}": _array(bytes([held.index]) + held.seed) for v, held in seeds.items()},
                **{f"key/{v}": _array(bytes([held.index]) + held.key) for v, held in keys.items()}}

