"""relay: forwards frames between the two halves of a split run, as the reference's relay server.

It validates framing, session, sender and sequence (the same Endpoint checks as every role),
then forwards the original bytes untouched. It never imports torch, so its image stays small.
"""

from __future__ import annotations

import logging

from splitfed.roles.endpoint import Endpoint, queue_name, warn_if_unsafe
from splitfed.security.keys import KeyList
from splitfed.roles.split_common import CLIENT, DONE, KINDS, RELAY, SERVER
from splitfed.transport import Transport

log = logging.getLogger(__name__)

ROUTES = {CLIENT: SERVER, SERVER: CLIENT}


class Relay:
    def __init__(self, session: str, transport: Transport, timeout: float = 300.0, trusted: KeyList | None = None):
        """With `trusted`, only frames signed by a listed client or server are forwarded."""
        self.endpoint = Endpoint(transport, session=session, role=RELAY, inbox=queue_name(session, RELAY), timeout=timeout, trusted=trusted)
        warn_if_unsafe(RELAY, session, trusted)
        self.targets = {sender: queue_name(session, target) for sender, target in ROUTES.items()}
        for target in self.targets.values():
            transport.declare(target)
        self.forwarded = 0

    def run(self) -> dict:
        """Forward until the server's `done` has gone through: the session is over."""
        log.info("relay ready on %s", self.endpoint.inbox)
        while True:
            message, delivery = self.endpoint.receive(KINDS, tuple(ROUTES))
            self.endpoint.send_frame(self.targets[message.sender], message.kind, delivery.body)
            self.endpoint.ack(delivery)
            self.forwarded += 1
            if message.sender == SERVER and message.kind == DONE:
                log.info("relay done after %d messages", self.forwarded)
                return {"forwarded": self.forwarded, "traffic": vars(self.endpoint.traffic)}
