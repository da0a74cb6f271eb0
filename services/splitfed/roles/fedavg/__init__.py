"""The FedAvg role family: `fedavg-server` (rounds, signed-update checks, aggregation,
checkpoints) and `fedavg-worker` (one share of the data; trains what it is sent). Declarations
only: the role classes are imported when a role is built, so declaring never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.config import NAME, setting
from splitfed.learning.settings import FederatedSettings, PartitionSettings, worker_ids  # noqa: F401 (the roles' names, used by scenarios)
from splitfed.observability import metrics
from splitfed.roles.declaration import Replicas, RoleSpec
from splitfed.roles.deployment import Party, RoundPolicy
from splitfed.roles.fedavg.common import SERVER, WORKER, CheckpointError  # noqa: F401 (the family's names, used by scenarios and the CLI)

@dataclass(kw_only=True)
class ServerDeployment(Party, RoundPolicy):
    timeout: float = setting(600.0, "Seconds to wait for workers before giving up.", min=0.1)
    checkpoint_dir: Path | None = setting(None, "Where the server keeps its checkpoint; a restart resumes from it.")
    max_samples: int = setting(10**9, "The most training samples one update may claim (a key list's max_samples can set less per worker).", min=1)


@dataclass(kw_only=True)
class WorkerDeployment(Party):
    timeout: float = setting(600.0, "Seconds to wait for the server before giving up.", min=0.1)
    worker_id: str = setting(help="This worker's name (as in the key list).", pattern=NAME)
    index: int = setting(help="Which share of the partition this worker holds (0-based).", min=0)


def _server(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.fedavg.server import FedAvgServer

    return FedAvgServer(settings, deployment, transport, identity, on_progress)


def _worker(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
    from splitfed.roles.fedavg.worker import FedAvgWorker

    return FedAvgWorker(settings, deployment, transport, identity, on_progress)


FAMILY = ("fedavg",)

ROLES = (
    RoleSpec(
        SERVER, "The FedAvg server: rounds, signed-update checks, aggregation, test accuracy, checkpoints.", FederatedSettings, ServerDeployment,
        _server,
        (*metrics.WIRE, metrics.ROUND, metrics.TRAIN_LOSS, metrics.TEST_ACCURACY, metrics.TEST_LOSS, metrics.ROUND_SECONDS, metrics.ROUND_BYTES,
         metrics.UPDATES, metrics.ACTIVE_WORKERS, metrics.WORKER_MISSED_ROUNDS, metrics.SAMPLED_WORKERS, metrics.SERVER_ACTIVE, metrics.DP_EPSILON,
         metrics.SECAGG_DROPOUTS, metrics.SECAGG_FAILURES),
        # Every update of a round stays unacked until the round is on disk: let them all in.
        prefetch=lambda settings: 2 * settings.round_sample_size(settings.workers) + 16,
        needs_data=lambda settings: settings.evaluate != "parties",  # the workers score the model on their own data
        families=FAMILY, torch=True, reads_data=True, replicas=Replicas.ANY, job=True, values_key="fedavgServer", image=SERVER,
    ),
    RoleSpec(
        WORKER, "A FedAvg worker: trains the global model on its own share and sends signed updates.", PartitionSettings, WorkerDeployment,
        _worker, (*metrics.WIRE, metrics.ROUND, metrics.TRAIN_LOSS, metrics.LOCAL_SAMPLES, metrics.UPDATE_BYTES, metrics.ACTIVITY_SECONDS), party=lambda learning, deployment: deployment.worker_id,
        index=lambda learning, deployment: deployment.index,
        families=FAMILY, torch=True, reads_data=True, replicas=Replicas.ANY, counts="workers", values_key="fedavgWorker", image=WORKER,
    ),
)
