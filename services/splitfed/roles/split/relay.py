"""relay: forwards frames between the two halves of a split run, so neither half needs to know
where the other lives.

It validates framing, session, sender and sequence (the same Endpoint checks as every role),
then forwards the original bytes untouched. It never imports torch, so its image stays small.
"""

from __future__ import annotations

import logging

from splitfed.protocol import Message
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity
from splitfed.roles.endpoint import Endpoint, queue_name
from splitfed.roles.split.common import CLIENT, DONE, KINDS, RELAY, SERVER
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)

ROUTES = {CLIENT: SERVER, SERVER: CLIENT}


class Relay(Role):
    def __init__(self, deployment, transport: Transport, identity: Identity = Identity()):  # noqa: ANN001 (roles.deployment.Service)
        """With a key list, only frames signed by a listed client or server are forwarded."""
        session = deployment.session
        self.endpoint = Endpoint(
            transport, session=session, role=RELAY, inbox=queue_name(session, RELAY), timeout=deployment.timeout, trusted=identity.trusted, peer_roles=tuple(ROUTES),
        )
        self.targets = {sender: queue_name(session, target) for sender, target in ROUTES.items()}
        for target in self.targets.values():
            transport.declare(target)
        self.forwarded = 0

    def run(self) -> dict:
        """Forward until the server's `done` has gone through: the session is over."""
        log.info("relay ready on %s", self.endpoint.inbox)
        self.consume()
        log.info("relay done after %d messages", self.forwarded)
        return {"forwarded": self.forwarded, "traffic": vars(self.endpoint.traffic)}

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return KINDS, tuple(ROUTES)

    def handle(self, message: Message, delivery: Delivery) -> bool:
        self.endpoint.send_frame(self.targets[message.sender], message.kind, delivery.body)  # untouched: its signature covers it
        self.forwarded += 1
        return message.sender == SERVER and message.kind == DONE
