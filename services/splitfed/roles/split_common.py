"""What the split-learning roles share: settings, queue names, message kinds, parameter files.

Start:                          client --hello{settings}--> server --hello{ok, problem}--> client
Per training batch (vanilla):   client --activations{x,y}--> server --gradients{g}--> client
Per training batch (u-shaped):  client --activations{x}--> server --outputs{h}--> client
                                client --gradients{g}--> server --gradients{g}--> client
Evaluation batch:               client --activations{x}, train=false--> server --outputs{h}--> client
End:                            client --done--> server --done--> client (the relay exits after both)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from splitfed.learning.settings import TrainSettings
from splitfed.roles.endpoint import queue_name

CLIENT, SERVER, RELAY = "split-client", "split-server", "relay"
HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE = "hello", "activations", "gradients", "outputs", "done"
KINDS = (HELLO, ACTIVATIONS, GRADIENTS, OUTPUTS, DONE)
# Settings both halves must agree on, or they would not be halves of one model.
SHARED_SETTINGS = ("dataset", "model", "cut_layer", "mode", "seed", "optimizer", "lr")


@dataclass
class SplitSettings(TrainSettings):
    session: str = "local"
    cut_layer: int | None = None  # None: the model's default cut (models.DEFAULT_CUT)
    mode: str = "vanilla"
    via: str = "relay"
    timeout: float = 300.0

    def shared(self) -> dict:
        return {name: getattr(self, name) for name in SHARED_SETTINGS}

    def peer_queue(self, target: str) -> str:
        """Where a half sends to reach `target`: the relay's inbox, or the target's own."""
        return queue_name(self.session, RELAY if self.via == "relay" else target)


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
