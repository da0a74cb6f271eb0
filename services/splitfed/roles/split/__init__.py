"""The split-learning role family: `relay`, `split-client` (a data owner: data, labels, first
layers; one or several), `split-server` (the remaining layers, no data) and `split-fed` (averages
the clients' layers in splitfed-v1 and v2, without torch). Declarations only: the role classes
are imported when a role is built, so declaring never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.config import setting
from splitfed.learning.settings import SplitNNSettings
from splitfed.observability import metrics
from splitfed.roles.declaration import Replicas, RoleSpec
from splitfed.roles.deployment import Party, Service, SigningService, SplitRouting
from splitfed.roles.split.common import client_name


@dataclass(kw_only=True)
class SplitParty(Party, SplitRouting):
    save: Path | None = setting(None, "Write this party's layers here at the end (safetensors).")


@dataclass(kw_only=True)
class SplitClientParty(SplitParty):
    client_index: int = setting(0, "Which of the run's --clients this is (0-based): its share of the data and its name, split-client-INDEX.", min=0)


def _client(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.client import SplitClient

    return SplitClient(settings, deployment, transport, identity, on_progress)


def _server(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.server import SplitServer

    return SplitServer(settings, deployment, transport, identity, on_progress)


def _fed(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.fed import SplitFed

    return SplitFed(settings, deployment, transport, identity)


def _relay(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.split.relay import Relay

    return Relay(deployment, transport, identity)


FAMILY = ("split",)

ROLES = (
    RoleSpec(
        "relay", "Forward frames between the two halves of a one-client split session (no torch).", None, Service, _relay, metrics.WIRE,
        families=FAMILY, values_key="relay", image="relay",
    ),
    RoleSpec(
        "split-client", "A data owner of a split session: data, labels, first layers; drives training.", SplitNNSettings, SplitClientParty, _client,
        (*metrics.WIRE, metrics.ROUND_TRIP, metrics.EPOCH, metrics.TRAIN_LOSS, metrics.TEST_ACCURACY, metrics.TEST_LOSS),
        party=lambda learning, deployment: client_name(deployment.client_index, learning.clients),
        index=lambda learning, deployment: deployment.client_index,
        families=FAMILY, torch=True, reads_data=True, replicas=Replicas.AT_LEAST_ONE, counts="clients", job=True, values_key="splitClient", image="split-client",
    ),
    RoleSpec(
        "split-server", "The server half of a split session: the remaining layers, no data; closes epochs, passes turns.", SplitNNSettings, SplitParty, _server,
        (*metrics.WIRE, metrics.SPLIT_ACTIVE_CLIENTS, metrics.SPLIT_EPOCH_CLIENTS, metrics.SPLIT_CLIENT_EPOCH),
        # u-shaped splitfed-v2 holds a batch of each waiting client unacked: let them all in.
        prefetch=lambda settings: 2 * settings.clients + 16,
        # No data: the input shape and the classes come from the data set's declaration, the task, or the clients' hellos.
        families=FAMILY, torch=True, job=True, values_key="splitServer", image="split-server",
    ),
    RoleSpec(
        "split-fed", "The fed server of splitfed-v1/v2: averages the clients' layers each epoch (no torch).", SplitNNSettings, SigningService, _fed,
        (*metrics.WIRE, metrics.AVERAGED_CLIENTS),
        families=FAMILY, job=True, values_key="splitFed", image="split-fed",
    ),
)
