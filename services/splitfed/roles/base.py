"""The receive loop that message-driven roles share (after kombu's ConsumerMixin): receive →
validate → count or refuse → handle → ack, with hooks for the role's own checks and refusals.
Roles that drive an exchange (a split client waiting for its reply, a FedAvg server holding a
round's updates until they are on disk) call `Endpoint.receive` themselves: the same
validation, counting and refusal path, with the ack where their crash-safety needs it."""

from __future__ import annotations

from collections.abc import Collection

from splitfed.protocol import Message
from splitfed.roles.endpoint import Endpoint, Rejection
from splitfed.transport import Delivery


class Role:
    endpoint: Endpoint

    def expecting(self) -> tuple[Collection[str], Collection[str] | None]:
        """(message kinds, senders) acceptable now; senders None: anyone the key list allows."""
        raise NotImplementedError

    def check(self, message: Message) -> None:
        """Raise ProtocolError for a message this role cannot apply, before it touches any state."""

    def on_reject(self, rejection: Rejection) -> None:
        """A frame was refused (already counted, logged and acked)."""

    def handle(self, message: Message, delivery: Delivery) -> bool:
        """Act on a valid message (`delivery`: the frame as it came); True when the role is finished."""
        raise NotImplementedError

    def consume(self) -> None:
        """Handle messages until `handle` says the role is finished. A message is acked only after
        it was handled, so one that was being handled when the party died comes back."""
        while True:
            kinds, senders = self.expecting()
            message, delivery = self.endpoint.receive(kinds, senders, self.check, self.on_reject)
            finished = self.handle(message, delivery)
            self.endpoint.ack(delivery)
            if finished:
                return
