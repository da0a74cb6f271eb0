"""What the split-learning roles share: queue names, message kinds, parameter files.

Start:                          client --hello{settings, nonce, fingerprint, input_shape, receives}--> server --hello{ok, problem, ref=nonce, run, receives}--> client
                                (receives: the largest message the sender accepts, which a relay between them holds to)
Per training batch (vanilla):   client --activations{x,y}--> server --gradients{g}--> client
Per training batch (u-shaped):  client --activations{x}--> server --outputs{h}--> client
                                client --gradients{g}--> server --gradients{g}--> client
End of a client's epoch share:  client --trained{epoch, period, train_loss}--> server
Epoch closed (in parallel):     server --closed{epoch, period, included, samples, evaluate=[i, N], own}--> each included client (and the fed)
A share after its period closed: server --closed{epoch, period, resume=[epoch, period] open now}--> that client
Evaluation batch:               client --activations{x}, train=false--> server --outputs{h}--> client
                                (the server answers with its layers as they were when the epoch closed)
Evaluated:                      evaluator --evaluated{epoch, correct, loss_sum, samples, own?}--> server  (its part i of N of the test set;
                                own={correct, loss_sum, samples}: its whole own test data, when closed said own)
End:                            server --done--> every client, the fed and the relay, which then exit
A run the server does not know:  client --activations{run=old}--> server --abort{run=old, reason}--> client

Several clients (`splitnn`) talk to the server directly, each on its own inbox. In splitfed-v1
and v2 each client also sends its layers to the fed (`split-fed`) before `trained`:
    client --head{epoch, period, layers}--> fed;  server --closed--> fed;  fed --average{epoch, period, layers}--> clients
The server names its run to the fed once it holds its model (server --hello{run, started, layout}--> fed), with a
client's layers' names, dtypes and shapes, which every head must match (and so the largest head).
The fed averages exactly the heads of the clients the server's `closed` includes, weighted by
the samples the server saw from each; the server never sees a client's layers. An epoch is one
period, or --syncs-per-epoch periods: each client's batches of the epoch cut into that many runs,
each closed and averaged as above; only the last one's `closed` asks for an evaluation. In round-robin
the server passes the turn and the layers go from client to client:
    server --turn{epoch, holder, previous, evaluate}--> every client
    previous --handoff{epoch, layers}--> holder;  previous --handed{to}--> server

A client's hello states its fingerprint (learning.tasks.fingerprint: its whole model's tensors and
its classes) and one sample's input shape. The server holds no data: where neither the data set
(a built-in one) nor the task (input_shape and classes) tells it what the model is built for, it
builds its model from the first hello it accepts, and refuses any client whose shape or
fingerprint differs from its own (the client stops with the server's line). With --evaluate
parties (or both) each evaluator also scores its whole own test data, and the server adds the
clients' counts up; the history holds the total and each client's figure.

The server draws the run id when it starts; its hello answers the client's nonce with it, and
every later message names the run and its recipient (Endpoint.bind), so frames recorded in an
earlier run of the session are refused as `replay`. A restart cannot resume a split run (each
half's layers and optimiser live only in its process), so it fails at once and says why: a
restarted server answers the client's next message with `abort`, and a restarted client's hello
is answered with ok=false once the run has begun. The relay keeps no state: it restarts and
goes on, and the halves drop the duplicates it may forward twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.learning.settings import WIRE_NUMPY_DTYPES, SplitSettings, split_client_name as client_name  # noqa: F401 (the roles name clients by it)
from splitfed.protocol import TensorSpec
from splitfed.roles.endpoint import queue_name
from splitfed.roles.limits import message_bytes

CLIENT, SERVER, RELAY = "split-client", "split-server", "relay"
FED = "split-fed"
HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE, ABORT = "hello", "activations", "gradients", "outputs", "done", "abort"
TRAINED, CLOSED, EVALUATED = "trained", "closed", "evaluated"
HEAD, AVERAGE = "head", "average"  # splitfed-v1/v2: a client's layers to the fed, and their average back
TURN, HANDOFF, HANDED = "turn", "handoff", "handed"  # round-robin
KINDS = (HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE, ABORT, TRAINED, CLOSED, EVALUATED)  # what a relay forwards: one client's
HANDSHAKE = (HELLO, ABORT)  # they speak of a run rather than within one: unbound, out of sequence
# Settings both halves must agree on, or they would not be halves of one model (the batch sizes and
# the wire dtype: each half's message-size limit is worked out from its own, `largest_messages`).
SHARED_SETTINGS = ("dataset", "model", "cut_layer", "mode", "seed", "optimizer", "lr", "epochs", "clients", "schedule", "syncs_per_epoch",
                   "batch_size", "eval_batch_size", "wire_dtype")


def shared(settings: SplitSettings) -> dict:
    return {name: getattr(settings, name) for name in SHARED_SETTINGS}


@dataclass(frozen=True)
class LargestMessages:
    """The largest message each half of a split model receives from the other, in bytes on the wire."""

    to_server: int
    to_client: int


def largest_messages(settings: SplitSettings, cut_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LargestMessages:
    """What the halves send each other at their largest, for one sample's shape at the cut and at
    the server half's output, in --wire-dtype (batches of at most --batch-size and
    --eval-batch-size, which both halves share). To the server: a training batch at the cut (with
    its labels in vanilla mode), an evaluation batch or a label prior's query at the cut, and in
    u-shaped mode a batch's gradients at its output. To a client: a batch's gradients at the cut,
    and the server half's outputs for a training batch (u-shaped, or a label prior's query) or an
    evaluation batch. Everything else between them is metadata alone."""
    wire, batch, evaluation = WIRE_NUMPY_DTYPES[settings.wire_dtype], settings.batch_size, settings.eval_batch_size
    labels = {"y": TensorSpec("int64", (batch,))} if settings.mode == "vanilla" else {}
    to_server = [{"x": TensorSpec(wire, (batch, *cut_shape)), **labels}, {"x": TensorSpec(wire, (evaluation, *cut_shape))}]
    if settings.mode == "u-shaped":
        to_server.append({"g": TensorSpec(wire, (batch, *out_shape))})
    to_client = [{"g": TensorSpec(wire, (batch, *cut_shape))}, {"h": TensorSpec(wire, (max(batch, evaluation), *out_shape))}]
    return LargestMessages(max(map(message_bytes, to_server)), max(map(message_bytes, to_client)))


def client_index(name: str) -> int:
    """The index in a client's party name (split-client: 0)."""
    return int(name.rpartition("-")[2]) if name != CLIENT else 0


def client_inbox(session: str, index: int, clients: int) -> str:
    return queue_name(session, CLIENT) if clients == 1 else queue_name(session, CLIENT, str(index))


def client_queue(session: str, via: str, index: int, clients: int) -> str:
    """Where client `index` is reached: its own inbox among several; one client may sit behind the relay."""
    if clients == 1:
        return peer_queue(session, via, CLIENT)
    return queue_name(session, CLIENT, str(index))


def peer_queue(session: str, via: str, target: str) -> str:
    """Where a half sends to reach `target`: the relay's inbox, or the target's own."""
    return queue_name(session, RELAY if via == "relay" else target)


def session_queues(session: str, clients: int = 1) -> list[str]:
    inboxes = [queue_name(session, CLIENT, str(index)) for index in range(clients)] if clients > 1 else []
    return [queue_name(session, role) for role in (CLIENT, SERVER, RELAY, FED)] + inboxes


def merged_state(parts: list[tuple[dict, int]]) -> dict:
    """Parts' parameters (state dict, index of its first layer in the full model) under the full
    model's layer indices, so the parties' layers merge into one model."""
    renamed = {}
    for state, offset in parts:
        for key, value in state.items():
            index, _, rest = key.partition(".")
            renamed[f"{int(index) + offset}.{rest}"] = value.contiguous()
    return renamed


def save_parts(path: Path, parts: list[tuple[dict, int]]) -> None:
    """Write `merged_state(parts)` as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(merged_state(parts), str(path))
