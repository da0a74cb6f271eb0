"""The receive loop every receiving role runs on (after kombu's ConsumerMixin): receive →
validate → count or refuse → handle → ack, with hooks for the role's own checks and refusals,
its deadlines and the moments its inbox runs dry. A role says what it accepts now
(`expecting`), what it does with a valid message (`handle`) and when it is done (`finished`);
the loop owns waiting, acking and giving up on silence.

A message is acked after it was handled, so one that was being handled when the party died
comes back; a role that acks a message itself returns `LATER` from `handle`: to hold it longer
(until its effect is on disk, or until shared layers are free), or, for a split client's turn, at
once, before the turn's own exchanges on the same inbox.

Roles that drive an exchange themselves (a split client waiting for the reply to the batch it
sent) call `Endpoint.receive` directly: the same validation, counting and refusal path."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Final

from splitfed.protocol import Message
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout
from splitfed.transport import Delivery

LATER: Final = "later"
"""`handle`'s answer when the role keeps the delivery unacked and acks it itself."""
POLL_SECONDS: Final = 1e-3  # the shortest wait: a look at the inbox that takes what is already there


class Role:
    endpoint: Endpoint
    finished: bool = False  # set by the role when its work is done; the loop returns then
    drains: bool = False  # True: `on_idle` runs each time the inbox is found empty, before a longer wait

    def expecting(self) -> tuple[Collection[str], Collection[str] | None]:
        """(message kinds, senders) acceptable now; senders None: anyone the key list allows."""
        raise NotImplementedError

    def check(self, message: Message) -> None:
        """Raise ProtocolError for a message this role cannot apply, before it touches any state."""

    def on_reject(self, rejection: Rejection) -> None:
        """A frame was refused (already counted, logged and acked)."""

    def handle(self, message: Message, delivery: Delivery) -> str | None:
        """Act on a valid message (`delivery`: the frame as it came). Return LATER when the role
        acks the delivery itself; anything else has the loop ack it now."""
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        """The monotonic time at which `on_deadline` must run next; None: no deadline pending."""
        return None

    def on_deadline(self) -> None:
        """Runs after every message handled and whenever a wait ends, so a deadline that has
        passed is acted on promptly (a silent client given up, a round closed)."""

    def on_idle(self) -> None:
        """With `drains`: the inbox is empty, so everything sent before now has been handled
        (silence is real, not a backlog)."""

    def on_silence(self, seconds: float) -> None:
        """No valid message for the endpoint's timeout. The default gives up."""
        kinds, _ = self.expecting()
        raise RoleTimeout(f"{self.endpoint.role}: no valid {'/'.join(kinds)} message on {self.endpoint.inbox} within {seconds:.0f}s")

    def consume(self) -> None:
        """Handle messages until the role is `finished`."""
        timeout = self.endpoint.timeout
        quiet_since = time.monotonic()
        while not self.finished:
            kinds, senders = self.expecting()
            received = None
            if self.drains:
                received = self.endpoint.receive(kinds, senders, self.check, self.on_reject, wait=POLL_SECONDS)
                if received is None:
                    self.on_idle()
            if received is None and not self.finished:
                wake = quiet_since + timeout
                deadline = self.next_deadline()
                if deadline is not None:
                    wake = min(wake, deadline)
                received = self.endpoint.receive(kinds, senders, self.check, self.on_reject, wait=max(POLL_SECONDS, wake - time.monotonic()))
            if received is not None:
                message, delivery = received
                if self.handle(message, delivery) != LATER:
                    self.endpoint.ack(delivery)
                quiet_since = time.monotonic()  # silence counts from when the role listens again, not while it works
            elif time.monotonic() - quiet_since >= timeout:
                self.on_silence(timeout)
                quiet_since = time.monotonic()
            self.on_deadline()
