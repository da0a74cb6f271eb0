"""The FedAvg server's checkpoint: `state.json` (the run's progress, `ServerState`) beside the
global model it names (`model-round-R[-calibrated].safetensors`) and the strategy's state for
that model (`strategy-round-R.safetensors`); `model.safetensors` is the newest model again, for
people and tools. Every file is written atomically, and state.json last: a crash at any point
leaves a state and the model it refers to.

A checkpoint belongs to one run (`ServerState.run`: the session and the learning settings a
resumed run may not change), and carries the epoch of the server that wrote it: a server that
finds a newer epoch than its own has been replaced (`Superseded`)."""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from splitfed.roles.fedavg.common import CheckpointError

STATE = "state.json"
LATEST = "model.safetensors"


@dataclass
class ServerState:
    """What a restarted server needs, written to `state.json` beside the model."""

    round: int = 1  # the round being collected
    workers: list[str] = field(default_factory=list)  # joined, sorted; each is sent every round's model
    # Workers that missed a round and have not been heard from since: no round waits for them
    # (a dead worker would stall every round); a late update or a new join brings them back.
    missed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    contributors: dict[str, list[str]] = field(default_factory=dict)  # round -> workers applied
    # The nonces of the joins each worker was admitted with: a replayed join is refused, while a
    # restarted worker, which joins with a new nonce, gets the current model.
    join_nonces: dict[str, list[str]] = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # what the checkpoint belongs to: session and learning settings
    # This run's id, fixed at its start and kept across restarts: every message of the run names
    # it (and its recipient) under the signature, so frames recorded in an earlier run with the
    # same session are refused as `replay`.
    run_id: str = ""
    epoch: int = 0  # takeovers so far: the server that wrote the highest one is the one in charge
    # The workers drawn for `sampled_round` (with --clients-per-round or --fraction), kept so a
    # server that resumes mid-round waits for the same ones even if others joined since.
    sampled: list[str] = field(default_factory=list)
    sampled_round: int = 0
    # With --calibration ccvr, once done: the record of the calibrated model, with the `round`
    # it calibrated (the round after the last) and the `workers` whose statistics it pooled.
    calibration: dict = field(default_factory=dict)
    # With --evaluate parties or both: the record of the last round closed, until the workers'
    # scores of its model are in (they come with the next round's collection, or after the last
    # round), and the workers asked to score it: those live when it closed.
    unscored: dict = field(default_factory=dict)
    scorers: list[str] = field(default_factory=list)
    # The size of each worker's evaluation data, as its first score since it joined gave it: a
    # later score over another number of samples is refused.
    evaluation_samples: dict[str, int] = field(default_factory=dict)
    # With --dp central: the clip the workers are told for the round being collected (it adapts
    # with --dp-adaptive-clip); None until the first round sets it from --dp-clip.
    dp_clip: float | None = None
    # With --dp central or local: each closed round's sampling rate, which its epsilon is amplified by.
    dp_rates: list[float] = field(default_factory=list)
    # Why the run ended before its last round (--dp-target-epsilon), if it did.
    stopped: str = ""

    def is_member(self, worker: str) -> bool:
        at = bisect.bisect_left(self.workers, worker)
        return at < len(self.workers) and self.workers[at] == worker

    def calibrated(self) -> bool:
        """Whether the model of this state is the calibrated one (the rounds are over and CCVR ran)."""
        return self.calibration.get("round") == self.round


class Superseded(CheckpointError):
    """Another server took over this session: this one must not write or send anything more."""


def model_file(round_number: int, calibrated: bool = False) -> str:
    return f"model-round-{round_number}{'-calibrated' if calibrated else ''}.safetensors"


def strategy_file(round_number: int) -> str:
    return f"strategy-round-{round_number}.safetensors"


class CheckpointStore:
    """One run's checkpoint folder (`folder` None: the server keeps no checkpoint, and every
    method finds nothing and writes nothing). `run` is what the checkpoint must belong to."""

    def __init__(self, folder: Path | None, run: dict):
        self.folder = folder
        self.run = run

    def saved(self) -> ServerState | None:
        """The checkpoint's state (None without one); CheckpointError if it belongs to another run."""
        if not self.folder or not (self.folder / STATE).exists():
            return None
        state = ServerState(**json.loads((self.folder / STATE).read_text()))
        if state.run != self.run:
            differing = sorted(key for key in {*state.run, *self.run} if state.run.get(key) != self.run.get(key))
            shown = ", ".join(f"{key} {state.run.get(key)!r} there, {self.run.get(key)!r} here" for key in differing[:4])
            raise CheckpointError(f"the checkpoint in {self.folder} belongs to another run ({shown}): use another --checkpoint-dir")
        return state

    def model(self, state: ServerState) -> dict[str, torch.Tensor]:
        """The global model `state` names. Our own files, written before the state that names
        them: never bytes from the network."""
        return load_file(str(self.folder / model_file(state.round, state.calibrated())))

    def strategy_tensors(self, state: ServerState) -> dict[str, torch.Tensor]:
        """The strategy's state saved with that model (none for a strategy that keeps none)."""
        path = self.folder / strategy_file(state.round)
        return load_file(str(path)) if path.exists() else {}

    def ensure_not_superseded(self, state: ServerState, session: str) -> None:
        """Superseded when the checkpoint on disk was written by a later takeover than `state`'s."""
        if self.folder and (self.folder / STATE).exists():
            epoch = json.loads((self.folder / STATE).read_text()).get("epoch", 0)
            if epoch > state.epoch:
                raise Superseded(f"another fedavg-server took over session {session} (epoch {epoch}, this one {state.epoch})")

    def write(self, state: ServerState, model: dict[str, torch.Tensor], strategy_state: dict[str, torch.Tensor], with_model: bool) -> None:
        """Write the global model for the round about to run (with_model, or when that round's is
        not on disk yet) with the strategy's state, then atomically replace state.json, which
        names it. A write that fails (a full disk) raises CheckpointError and leaves the last
        complete checkpoint."""
        if not self.folder:
            return
        try:
            self._write(state, model, strategy_state, with_model)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the checkpoint in {self.folder}: {exc.strerror or exc}; the last complete checkpoint is intact"
            ) from None

    def _write(self, state: ServerState, model: dict[str, torch.Tensor], strategy_state: dict[str, torch.Tensor], with_model: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        current = self.folder / model_file(state.round, state.calibrated())
        written = save({k: v.cpu().contiguous() for k, v in model.items()}) if with_model or not current.exists() else None
        if written is not None:
            _atomic(current, written)
            # The strategy's state (momentum, moments, control variate) belongs to this model.
            if strategy_state:
                _atomic(self.folder / strategy_file(state.round), save({k: v.cpu().contiguous() for k, v in strategy_state.items()}))
        _atomic(self.folder / STATE, json.dumps(vars(state)).encode())
        # Only the previous round's files, which this server wrote: nothing else in the folder.
        for old in (model_file(state.round - 1), model_file(state.round - 1, True), strategy_file(state.round - 1)):
            (self.folder / old).unlink(missing_ok=True)
        if with_model:
            _atomic(self.folder / LATEST, written)


def _atomic(path: Path, content: bytes) -> None:
    """Write through a temporary file, fsync it, rename it over `path`, fsync the folder. A write
    that fails leaves `path` as it was and no temporary file behind."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
