"""The split-learning role family: `relay`, `split-client` (the data owner: data, labels, first
layers) and `split-server` (the remaining layers, no data). Declarations only: the role classes
are imported when a role is built, so declaring never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.config import setting
from splitfed.learning.settings import SplitSettings
from splitfed.observability import metrics
from splitfed.roles.declaration import RoleSpec
from splitfed.roles.deployment import Party, Service, SplitRouting


@dataclass(kw_only=True)
class SplitParty(Party, SplitRouting):
    save: Path | None = setting(None, "Write this party's layers here at the end (safetensors).")


def _client(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.client import SplitClient

    return SplitClient(settings, deployment, transport, identity, on_progress)


def _server(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.server import SplitServer

    return SplitServer(settings, deployment, transport, identity, on_progress)


def _relay(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.relay import Relay

    return Relay(deployment, transport, identity)


ROLES = (
    RoleSpec("relay", "Forward frames between the two halves of one split session (no torch).", None, Service, _relay, metrics.WIRE),
    RoleSpec(
        "split-client", "The data owner of a split session: data, labels, first layers; drives training.", SplitSettings, SplitParty, _client,
        (*metrics.WIRE, metrics.ROUND_TRIP, metrics.EPOCH, metrics.TRAIN_LOSS, metrics.TEST_ACCURACY, metrics.TEST_LOSS),
    ),
    RoleSpec("split-server", "The server half of a split session: the remaining layers, no data.", SplitSettings, SplitParty, _server, metrics.WIRE),
)
