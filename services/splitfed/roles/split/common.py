"""What the split-learning roles share: queue names, message kinds, parameter files.

Start:                          client --hello{settings, nonce}--> server --hello{ok, problem, ref=nonce, run}--> client
Per training batch (vanilla):   client --activations{x,y}--> server --gradients{g}--> client
Per training batch (u-shaped):  client --activations{x}--> server --outputs{h}--> client
                                client --gradients{g}--> server --gradients{g}--> client
Evaluation batch:               client --activations{x}, train=false--> server --outputs{h}--> client
End:                            client --done--> server --done--> client (the relay exits after both)
A run the server does not know:  client --activations{run=old}--> server --abort{run=old, reason}--> client

The server draws the run id when it starts; its hello answers the client's nonce with it, and
every later message names the run and its recipient (Endpoint.bind), so frames recorded in an
earlier run of the session are refused as `replay`. A restart cannot resume a split run (each
half's layers and optimiser live only in its process), so it fails at once and says why: a
restarted server answers the client's next message with `abort`, and a restarted client's hello
is answered with ok=false once the run has begun. The relay keeps no state: it restarts and
goes on, and the halves drop the duplicates it may forward twice.
"""

from __future__ import annotations

from pathlib import Path

from splitfed.learning.settings import SplitSettings
from splitfed.roles.endpoint import queue_name

CLIENT, SERVER, RELAY = "split-client", "split-server", "relay"
HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE, ABORT = "hello", "activations", "gradients", "outputs", "done", "abort"
KINDS = (HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE, ABORT)
HANDSHAKE = (HELLO, ABORT)  # they speak of a run rather than within one: unbound, out of sequence
# Settings both halves must agree on, or they would not be halves of one model.
SHARED_SETTINGS = ("dataset", "model", "cut_layer", "mode", "seed", "optimizer", "lr")


def shared(settings: SplitSettings) -> dict:
    return {name: getattr(settings, name) for name in SHARED_SETTINGS}


def peer_queue(session: str, via: str, target: str) -> str:
    """Where a half sends to reach `target`: the relay's inbox, or the target's own."""
    return queue_name(session, RELAY if via == "relay" else target)


def session_queues(session: str) -> list[str]:
    return [queue_name(session, role) for role in (CLIENT, SERVER, RELAY)]


def save_parts(path: Path, parts: list[tuple[dict, int]]) -> None:
    """Write parts' parameters (state dict, index of its first layer in the full model) under the
    full model's layer indices, as safetensors, so the parties' files merge into one model."""
    from safetensors.torch import save_file

    renamed = {}
    for state, offset in parts:
        for key, value in state.items():
            index, _, rest = key.partition(".")
            renamed[f"{int(index) + offset}.{rest}"] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(path))
