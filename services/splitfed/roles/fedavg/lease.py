"""Which of the servers started on one session runs it: the one that holds the session's lock,
an exclusive queue on the broker (`Transport.hold`). The others wait as standbys and touch
nothing; when the holder's connection ends (its process died), the broker drops the queue and
a standby takes it. The lock says who may act now; the checkpoint's epoch (checkpoints.py) says
whether a server that lost the lock for a while was replaced meanwhile."""

from __future__ import annotations

import logging
import math
import time

from splitfed.roles.endpoint import RoleTimeout, queue_name
from splitfed.roles.fedavg.common import SERVER
from splitfed.transport import Transport

log = logging.getLogger(__name__)

STANDBY_POLL = 1.0  # seconds between a standby's tries for the lock (AMQP says nothing when a queue goes)
STANDBY_NOTICE = 60.0  # seconds between a standby's log lines


class Lease:
    def __init__(self, transport: Transport, session: str, timeout: float):
        """`timeout`: how long `ensure_held` waits for a lost broker connection to come back."""
        self.transport = transport
        self.session = session
        self.timeout = timeout
        self.lock = queue_name(session, SERVER, "lock")

    def acquire(self) -> None:
        """Wait as a standby until this server holds the session's lock."""
        told = -math.inf
        while not self.transport.hold(self.lock):
            if time.monotonic() - told >= STANDBY_NOTICE:
                log.info("standby: another fedavg-server holds session %s; taking over when it stops", self.session)
                told = time.monotonic()
            time.sleep(STANDBY_POLL)

    def ensure_held(self) -> None:
        """This server still holds the lock, waiting for a lost connection to come back with it;
        RoleTimeout when it does not."""
        if not self.transport.holds(self.lock, self.timeout):
            raise RoleTimeout(f"the broker connection did not come back within {self.timeout:.0f}s")
