"""Running one role as a long-lived service (what `splitfed serve ROLE` and every image does):
settings → logging → metrics server → transport → role loop → result."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitfed import config
from splitfed.observability import metrics
from splitfed.roles.declaration import Identity, Progress, RoleSpec
from splitfed.transport import Connection, connect, warn_if_unencrypted

log = logging.getLogger("splitfed")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def unknown_variables(spec: RoleSpec, environ: Mapping[str, str]) -> list[str]:
    """SPLITFED_* variables that `serve ROLE` has no option for: a typo or a renamed option that
    would otherwise be silently ignored."""
    known = spec.env_names()
    return sorted(name for name in environ if name.startswith(config.ENV_PREFIX) and name not in known)


def output_problem(path: Path) -> str | None:
    """Why a result could not be written to `path`, checked before any work is done."""
    if not path.parent.is_dir():
        return f"{path}: folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path}: not writable by this user (uid {os.getuid()})"
    return None


def print_progress(progress: Progress) -> None:
    """Progress as JSON lines on stdout, for an orchestrating `splitfed run`."""
    print(json.dumps(asdict(progress)), flush=True)


def serve(spec: RoleSpec, values: dict[str, Any]) -> dict:
    """Build the role's settings from `values` (flags and SPLITFED_* variables, already merged by
    the CLI), connect to the broker and run the role to its end."""
    learning = config.build(spec.learning, values) if spec.learning else None
    deployment = config.build(spec.deployment, values)
    connection = config.build(Connection, values)
    configure_logging(deployment.log_level)
    for name in unknown_variables(spec, os.environ):
        log.warning("%s is set, but serve %s has no such option: ignored", name, spec.name)
    if deployment.out is not None and (problem := output_problem(deployment.out)):
        raise ValueError(f"--out {problem}")
    threads = getattr(deployment, "torch_threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    party = spec.party_name(learning, deployment)
    if spec.torch and learning is not None:  # a device this machine lacks stops the role here, in one line
        from splitfed.learning.device import resolve

        resolve(learning.device)
    if spec.reads_data and spec.needs_data(learning):  # a task or data that cannot work stops the role here, before it joins anyone
        from splitfed.learning.tasks import preflight

        preflight([(learning, spec.context(learning, deployment))])
    identity = Identity.load(party, deployment.key_list, getattr(deployment, "private_key", None))
    broker = connection.amqp_broker(party)
    warn_if_unencrypted(broker, identity.trusted is not None)
    metrics.serve(deployment.metrics_port, deployment.metrics_address)
    extra = {"prefetch": spec.prefetch(learning)} if spec.prefetch else {}
    on_progress = print_progress if getattr(deployment, "progress_events", False) else None
    with connect(broker, connection, party, **extra) as transport:
        result = spec.build(learning, deployment, transport, identity, on_progress).run()
    if deployment.out is not None:
        deployment.out.write_text(json.dumps(result) + "\n")
    if on_progress:  # the last line: the result, for `splitfed launch`, which reads it from the pod's log
        on_progress(Progress("result", record=result))
    return result
