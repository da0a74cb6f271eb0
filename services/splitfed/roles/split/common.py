"""What the split-learning roles share: queue names, message kinds, parameter files.

Start:                          client --hello{settings}--> server --hello{ok, problem}--> client
Per training batch (vanilla):   client --activations{x,y}--> server --gradients{g}--> client
Per training batch (u-shaped):  client --activations{x}--> server --outputs{h}--> client
                                client --gradients{g}--> server --gradients{g}--> client
Evaluation batch:               client --activations{x}, train=false--> server --outputs{h}--> client
End:                            client --done--> server --done--> client (the relay exits after both)
"""

from __future__ import annotations

from pathlib import Path

from splitfed.learning.settings import SplitSettings
from splitfed.roles.endpoint import queue_name

CLIENT, SERVER, RELAY = "split-client", "split-server", "relay"
HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE = "hello", "activations", "gradients", "outputs", "done"
KINDS = (HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE)
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
