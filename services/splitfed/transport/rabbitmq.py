"""RabbitMQ transport (pika): one connection, driven by one thread at a time.

A caller waiting on the transport (a publish's confirm, a delivery) drives the connection on its
own thread when nobody else does, so a publish or a delivery costs no hand-over between threads.
When the caller leaves the transport alone (it trains), an I/O thread drives the connection, so
heartbeats are answered and deliveries taken in meanwhile; it hands the connection back as soon
as a caller waits (interrupted through `add_callback_threadsafe`). Operations queue in a deque
and whoever drives runs them in order; results come back through futures. Only the I/O thread
connects, reconnects and stops. Publisher confirms are on, and `publish` returns only once the
broker confirmed the message; acks are manual and sent only when the caller says the work is done. Frames larger than
`chunk_size` travel as numbered chunks (`transport.chunks`), reassembled before delivery, so no message hits
the broker's `max_message_size`; the prefetch window keeps room for the chunks of partly arrived
messages. Connection loss is retried with capped exponential back-off; refused credentials,
access or channel errors are final.

The broker may be several addresses (a cluster's nodes): every connection tries them in turn,
each reconnect starting one further along, so a client whose node died moves to the next. With
`queue_type="quorum"`, durable queues are quorum queues, replicated on the cluster's nodes: they
and their persistent messages survive losing a minority of nodes, their leader included.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pika
import pika.exceptions as pex

from splitfed.transport.base import AdmitHook, Delivery, LockLost, RejectHook, Transport, TransportError
from splitfed.transport.broker import AmqpBroker, TLSOptions
from splitfed.transport.chunks import PARTIAL_TTL, Reassembler, Refused, Whole, split

log = logging.getLogger(__name__)

MAX_PREFETCH = 65535  # AMQP's prefetch count is an unsigned 16-bit number
QUEUE_TYPES = ("classic", "quorum")
HANDOVER_IDLE = 0.25  # seconds a caller leaves the transport alone before the I/O thread drives the connection
# A quorum queue nacks while it has no leader (just declared, or mid-election); the frame was not
# taken, so sending it again is safe (receivers drop duplicates by sequence number anyway).
# An election after its leader's node dies can take several seconds (seen in CI: more than 6 s).
NACK_PATIENCE = 30.0  # seconds of nacks before the refusal stands
NACK_PAUSES = (0.1, 5.0)  # the first pause between tries, doubling up to the last


class _Nacked(Exception):
    """The broker nacked a publish: not taken, may be sent again."""


class RabbitTransport(Transport):
    def __init__(
        self,
        broker: AmqpBroker | str,  # or its text (one amqp(s):// URL, or several comma-separated), parsed here with `tls`
        *,
        chunk_size: int = 16 * 1024**2,
        max_message_bytes: int = 2 * 1024**3,
        prefetch: int = 16,
        heartbeat: int | None = None,
        tls: TLSOptions | None = None,  # for a broker given as text: an AmqpBroker carries its own
        queue_expires_ms: int | None = 30 * 60 * 1000,
        durable_queue_expires_ms: int | None = 24 * 3600 * 1000,
        connect_timeout: float = 30.0,
        operation_timeout: float = 300.0,
        on_reject: RejectHook | None = None,
        partial_ttl: float = PARTIAL_TTL,
        queue_type: str = "classic",
        nack_patience: float = NACK_PATIENCE,
        name: str = "splitfed",
    ):
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        if not isinstance(broker, AmqpBroker):
            broker = AmqpBroker.parse(broker, tls, who=name)
        self._params = [self._parameters(address, name, heartbeat, broker.tls) for address in broker.urls]
        for params in self._params:
            # A caller driving the connection waits inside pika, as the I/O thread would: a broker
            # that blocks publishers (a resource alarm) for longer than an operation may take drops
            # the connection (reconnected, the operation retried) rather than holding it for ever.
            if params.blocked_connection_timeout is None:
                params.blocked_connection_timeout = operation_timeout
        self._queue_type = queue_type
        self._chunk_size = chunk_size
        self._max_message_bytes = max_message_bytes
        self._chunks = Reassembler(chunk_size, max_message_bytes, partial_ttl)
        # A message's chunks are acked together after the work, so all of them must fit in flight:
        # the window has room for `prefetch` messages and for the chunks partial messages reserve.
        self._prefetch = prefetch + self._chunks.reserve
        if self._prefetch > MAX_PREFETCH:
            raise ValueError(
                f"--chunk-size {chunk_size} is too small: two {max_message_bytes}-byte messages would need {self._chunks.reserve} chunks in flight, "
                f"and AMQP allows {MAX_PREFETCH} (use at least {-(-2 * max_message_bytes // (MAX_PREFETCH - prefetch))} bytes)"
            )
        # An abandoned session's queues vanish after this long unused; durable ones hold state a
        # restarted party needs, so they wait longer.
        self._expires_ms = {False: queue_expires_ms, True: durable_queue_expires_ms}
        self._operation_timeout = operation_timeout
        self._nack_patience = nack_patience
        self._on_reject = on_reject or (lambda reason, detail: log.warning("rejected %s: %s", reason, detail))
        self._on_reject_of: dict[str, RejectHook] = {}  # watched queues' own

        self._ops: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._acks: collections.deque[tuple[int, list[int]]] = collections.deque()  # (generation, tags), sent after the queued operations
        self._declared: dict[str, bool] = {}  # queue -> durable, redeclared after a reconnect
        self._inboxes: dict[str, collections.deque[Delivery]] = {}  # consumed queues, guarded by _cv
        self._locks: set[str] = set()  # exclusive queues this connection holds, taken back first on a reconnect
        self._holding = threading.Event()  # connected, with every lock in _locks
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self.generation = 0  # connections made so far; a tag from an older one is stale
        self._connected = threading.Event()
        # Who drives the connection (see _await): one thread at a time, under _cv.
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # callers wait here: for the connection, a delivery, an operation
        self._io_cv = threading.Condition(lock)  # the I/O thread waits here for its turn
        self._owner: int | None = None  # ident of the thread driving the connection
        self._io_ident: int | None = None
        self._waiters = 0  # callers waiting on the transport (they drive it, or wait for who does)
        self._idle_since = time.monotonic()  # when a caller last let go of the connection
        self._broken: BaseException | None = None  # a failure met on a caller's thread, for the I/O thread
        self._handoff = False  # operations were left queued for the I/O thread to run now
        self._closing = False
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"amqp-{name}", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout) or self._fatal:
            self._closing = True
            addresses = ", ".join(f"{params.host}:{params.port}" for params in self._params)
            raise TransportError(f"cannot connect to RabbitMQ at {addresses}: {self._fatal or 'timed out'}")

    @staticmethod
    def _parameters(url: str, name: str, heartbeat: int | None, tls: TLSOptions | None) -> pika.URLParameters:
        params = pika.URLParameters(url)
        params.client_properties = {"connection_name": name}
        if heartbeat is not None:
            params.heartbeat = heartbeat
        if url.startswith("amqps://"):
            tls = tls or TLSOptions()
            # Each node's certificate is checked against its own host name.
            params.ssl_options = pika.SSLOptions(tls.context(), tls.server_hostname or params.host)
        return params

    # -- caller side -----------------------------------------------------------------

    def declare(self, queue_name: str, *, durable: bool = False) -> None:
        self._call(lambda: self._declare(queue_name, durable))

    def publish(self, queue_name: str, body: bytes, *, persistent: bool = False, must_exist: bool = False) -> None:
        if len(body) <= self._chunk_size:
            self._publish_confirmed(queue_name, body, persistent, None)
            return
        if len(body) > self._max_message_bytes:
            raise TransportError(f"message of {len(body)} bytes exceeds max_message_bytes {self._max_message_bytes}")
        for piece, headers in split(body, self._chunk_size):
            self._publish_confirmed(queue_name, piece, persistent, headers)

    def _publish_confirmed(self, name: str, body: bytes, persistent: bool, headers: dict | None) -> None:
        """Publish until the broker confirms it, trying again after a nack for up to the
        transport's nack patience, with pauses doubling from NACK_PAUSES[0] to NACK_PAUSES[1]."""
        deadline, pause = time.monotonic() + self._nack_patience, NACK_PAUSES[0]
        while True:
            try:
                self._call(lambda: self._publish(name, body, persistent, headers))
                return
            except _Nacked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"broker refused a message for {name!r} for {self._nack_patience:g} s") from None
                pause = min(pause, remaining)
                log.warning("broker nacked a message for %r; trying again in %.1fs", name, pause)
                time.sleep(pause)
                pause = min(2 * pause, NACK_PAUSES[1])

    def receive(self, queue_name: str, timeout: float) -> Delivery | None:
        if queue_name not in self._inboxes:
            self._call(lambda: self._consume(queue_name))
        inbox = self._inboxes[queue_name]
        deadline = time.monotonic() + timeout
        while self._await(lambda: bool(inbox), deadline):
            with self._cv:
                if inbox:  # else another receiver took it, or a reconnect dropped it as stale
                    return inbox.popleft()
        return None

    def ack(self, delivery: Delivery) -> None:
        """Queued, not waited for: it goes out right after this caller's next publish (a reply
        the caller drives out does not wait behind it) or on its next wait that drives the
        connection; otherwise from the I/O thread within HANDOVER_IDLE, or at once if another
        thread drives the connection now."""
        self._raise_if_fatal()
        self._acks.append(delivery.tag)
        if self._owner is not None:
            self._wake()

    def watch(self, queue: str, *, max_bytes: int, on_reject: RejectHook, admit: AdmitHook | None = None) -> None:
        self._chunks.watch(queue, max_bytes, admit)
        self._on_reject_of[queue] = on_reject

    def hold(self, lock: str) -> bool:
        return lock in self._locks or self._call(lambda: self._hold(self._connection, lock))

    def holds(self, lock: str, timeout: float) -> bool:
        self._raise_if_fatal()
        held = self._holding.wait(timeout)
        self._raise_if_fatal()  # LockLost, found while reconnecting
        return held and lock in self._locks

    def delete(self, queue_name: str) -> None:
        self._call(lambda: self._delete(queue_name))

    def close(self) -> None:
        if self._closing:
            return
        # Let queued acks and publishes go out before the connection closes.
        try:
            self._call(lambda: None, timeout=10)
        except TransportError:
            pass
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            self._io_cv.notify()
        self._wake()
        self._thread.join(timeout=10)

    def _call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        future = self._submit(fn)
        if not self._await(future.done, time.monotonic() + (timeout or self._operation_timeout)):
            future.cancel()  # not run later behind the caller's back
            raise TransportError(f"broker operation timed out after {timeout or self._operation_timeout}s")
        return future.result()

    def _submit(self, fn: Callable[[], Any]) -> Future:
        self._raise_if_fatal()
        future: Future = Future()
        self._ops.append((fn, future))
        if not self._thread.is_alive():  # stopped between the check above and the append
            self._fail_pending(TransportError(f"RabbitMQ transport stopped: {self._fatal or 'closed'}"))
        return future

    def _wake(self) -> None:
        """Interrupt whichever thread is waiting on the connection's socket, so it runs queued
        operations (and, if it is the I/O thread, hands the connection over to a waiting caller)."""
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(self._drain)
            except Exception:  # connection is closing; the I/O thread drains after reconnecting
                pass

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            stopped = LockLost if isinstance(self._fatal, LockLost) else TransportError  # a replaced holder must know it
            raise stopped(f"RabbitMQ transport stopped: {self._fatal}")

    # -- who drives the connection -------------------------------------------------------
    # A caller waiting on the transport (for a confirm, a reply, the broker's answer) drives the
    # connection itself when nobody else does: no hand-over to another thread and back for each
    # publish and each delivery. A caller that has left the transport alone for `HANDOVER_IDLE`
    # seconds (training) leaves the connection to the I/O thread, which answers heartbeats and
    # takes in deliveries meanwhile, and gives it back as soon as a caller waits. Either way one
    # thread at a time touches pika (`_owner`), and only the I/O thread connects, reconnects and
    # stops: a failure met on a caller's thread is handed to it (`_broken`) as if met there.

    def _usable(self) -> bool:
        return self._channel is not None and self._broken is None and not self._closing

    def _await(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until `ready()` (True) or `deadline` (False), driving the connection on this thread
        whenever it is free, and asking the I/O thread for it when that one has it."""
        me = threading.get_ident()
        woken = None
        with self._cv:
            self._waiters += 1
            try:
                while not ready():
                    self._raise_if_fatal()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    if self._owner is None and self._usable():
                        self._owner = me
                        self._cv.release()
                        try:
                            self._owned(lambda: self._drive(ready, deadline))
                        finally:
                            self._cv.acquire()
                        continue
                    if self._owner is not None and self._owner != woken:
                        woken = self._owner  # once per holder: it runs our operations, and the I/O thread hands over
                        self._cv.release()
                        try:
                            self._wake()
                        finally:
                            self._cv.acquire()
                        continue
                    self._cv.wait(min(remaining, 1.0))
                return True
            finally:
                self._waiters -= 1

    def _owned(self, work: Callable[[], None]) -> None:
        """Run `work` on this caller's thread, which holds the connection, then let go of it. A
        failure is the I/O thread's to handle (reconnect or stop), as if it had met it."""
        try:
            work()
        except Exception as exc:
            self._broken = exc
        except BaseException:  # interrupted half-way through pika's work: the connection's state is unknown
            self._broken = pex.StreamLostError("interrupted while driving the connection")
            raise
        finally:
            self._release()

    def _drive(self, ready: Callable[[], bool], deadline: float) -> None:
        connection = self._connection
        while True:
            self._drain()
            if ready() or self._closing or (remaining := deadline - time.monotonic()) <= 0:
                return
            connection.process_data_events(time_limit=min(remaining, 1.0))
            self._expire_partials()

    def _release(self) -> None:
        with self._cv:
            self._owner = None
            self._idle_since = time.monotonic()
            if self._waiters:
                self._cv.notify_all()
            if self._ops or self._acks or self._broken is not None or self._closing:
                self._handoff = bool(self._ops or self._acks)  # queued while this thread drove: the I/O thread runs them now
                self._io_cv.notify()

    def _done(self) -> None:
        """Operations finished on the thread driving the connection: wake callers waiting for them."""
        if self._waiters:
            with self._cv:
                self._cv.notify_all()

    # -- I/O thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        backoff = 0.5
        while not self._closing:
            try:
                self._connect()
                self._release()
                backoff = 0.5
                while not self._closing:
                    self._serve()
            except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError, pex.AuthenticationError) as exc:
                self._stop(exc)
            except pex.ConnectionClosedByBroker as exc:
                if exc.reply_code not in (320, 541):  # broker shutting down or internal error: retry
                    self._stop(exc)
                else:
                    backoff = self._lost(exc, backoff)
            except (pex.ChannelClosedByBroker, pex.ChannelWrongStateError) as exc:
                self._stop(exc)
            except (pex.AMQPConnectionError, pex.StreamLostError, ConnectionError, OSError) as exc:
                backoff = self._lost(exc, backoff)
            except Exception as exc:  # a bug or an unforeseen pika state: fail loudly, never hang callers
                self._stop(exc)
        self._take(wait=10.0)
        self._disconnect()
        self._fail_pending(TransportError("RabbitMQ transport closed"))
        with self._cv:
            self._owner = None
            self._cv.notify_all()

    def _take(self, wait: float) -> None:
        """Hold the connection on the I/O thread, waiting up to `wait` seconds for a caller to let go."""
        deadline = time.monotonic() + wait
        with self._cv:
            while self._owner not in (None, self._io_ident) and (remaining := deadline - time.monotonic()) > 0:
                self._io_cv.wait(remaining)
            self._owner = self._io_ident

    def _serve(self) -> None:
        """Wait until the connection is the I/O thread's to drive (free, nobody waiting, and idle
        for HANDOVER_IDLE or with operations queued), then drive it until a caller waits. Raises
        a failure a caller met, holding the connection for the handler."""
        with self._cv:
            while True:
                if self._closing:
                    return
                if self._owner is None:
                    if self._broken is not None:
                        self._owner = self._io_ident
                        broken, self._broken = self._broken, None
                        raise broken
                    idle = time.monotonic() - self._idle_since
                    if not self._waiters and ((self._handoff and (self._ops or self._acks)) or idle >= HANDOVER_IDLE):
                        self._owner, self._handoff = self._io_ident, False
                        break
                    timeout = HANDOVER_IDLE - idle if not self._waiters else HANDOVER_IDLE
                else:
                    timeout = HANDOVER_IDLE
                self._io_cv.wait(max(timeout, 0.001))
        # Driving: an exception leaves the connection held for _run's handlers.
        while not self._closing and not self._waiters:
            self._drain()
            self._connection.process_data_events(time_limit=1)
            self._expire_partials()
        self._release()

    def _stop(self, exc: BaseException) -> None:
        log.error("RabbitMQ transport stopping: %r", exc)
        self._fatal = exc
        self._closing = True
        self._connected.set()
        self._holding.set()  # wakes whoever waits in `holds`, to hear why
        self._fail_pending(TransportError(str(exc)))
        with self._cv:
            self._cv.notify_all()

    def _fail_pending(self, error: TransportError) -> None:
        while self._ops:
            _, future = self._ops.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._done()

    def _lost(self, exc: BaseException, backoff: float) -> float:
        log.warning("RabbitMQ connection lost (%r); reconnecting in %.1fs", exc, backoff)
        self._disconnect()
        # The next attempt starts with the next address: the first one, where this connection
        # most likely was, may be the node that died (pika tries the others after it anyway).
        self._params.append(self._params.pop(0))
        time.sleep(backoff)
        return min(backoff * 2, 30.0)

    def _connect(self) -> None:
        self._take(wait=self._operation_timeout)
        connection = pika.BlockingConnection(self._params)
        # Locks first, before this connection is anyone's to use: nothing queued while it was
        # down (a publish, an ack) goes out from a holder that has been replaced.
        for lock in sorted(self._locks):
            if not self._hold(connection, lock):
                connection.close()
                raise LockLost(f"lock {lock!r} was taken by another connection while this one was down")
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=self._prefetch)
        self._connection, self._channel = connection, channel
        self.generation += 1
        self._chunks.clear()
        for name, durable in self._declared.items():
            self._declare(name, durable)
        for name, inbox in self._inboxes.items():
            # Unacked deliveries of the old connection are redelivered; drop our stale copies.
            with self._cv:
                fresh = [d for d in inbox if d.tag[0] == self.generation]
                inbox.clear()
                inbox.extend(fresh)
            self._start_consumer(name)
        if self.generation > 1:
            log.info("RabbitMQ reconnected (connection %d)", self.generation)
        self._holding.set()
        self._connected.set()

    def _hold(self, connection: pika.BlockingConnection, lock: str) -> bool:
        """Declare `lock` as an exclusive queue on `connection`, on a channel of its own: the
        broker's refusal (405 RESOURCE_LOCKED: another connection holds it) closes that channel,
        not the one everything else uses. The queue lives as long as the connection does."""
        channel = connection.channel()
        try:
            channel.queue_declare(lock, exclusive=True, auto_delete=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != 405:
                raise
            return False
        channel.close()
        self._locks.add(lock)
        return True

    def _disconnect(self) -> None:
        self._holding.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken; nothing left to release
                pass

    def _drain(self) -> None:
        """Run the queued operations, then send the queued acks."""
        while self._ops and self._channel is not None:
            fn, future = self._ops.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up on it
            try:
                future.set_result(fn())
            except (pex.AMQPConnectionError, pex.StreamLostError, ConnectionError) as exc:
                # Retried on the next connection (a publish may then arrive twice: at least
                # once, and every role drops duplicates). A running future cannot be re-armed,
                # so a fresh one forwards the result to the caller's.
                retry: Future = Future()
                retry.add_done_callback(lambda done, caller=future: _forward(done, caller))
                self._ops.appendleft((fn, retry))
                raise exc
            except Exception as exc:
                future.set_exception(exc)
                if isinstance(exc, pex.ChannelClosedByBroker):
                    raise
            finally:
                self._done()
        while self._acks and self._channel is not None:
            self._ack(*self._acks.popleft())

    def _delete(self, name: str) -> None:
        self._declared.pop(name, None)
        self._inboxes.pop(name, None)  # no consumer to restore after a reconnect
        self._channel.queue_delete(name)

    def _declare(self, name: str, durable: bool) -> None:
        expires = self._expires_ms[durable]
        arguments: dict[str, Any] = {"x-expires": expires} if expires else {}
        if durable and self._queue_type == "quorum":
            # Quorum queues exist only durable, so transient ones stay classic. No x-delivery-limit:
            # every frame a role refuses is acked, so nothing loops for being malformed, and an
            # update the server holds unacked comes back once per server restart or failover; a
            # limit would drop it after that many, losing an update the checkpoint still needs.
            arguments["x-queue-type"] = "quorum"
        self._channel.queue_declare(name, durable=durable, arguments=arguments or None)
        self._declared[name] = durable

    def _publish(self, name: str, body: bytes, persistent: bool, headers: dict | None) -> None:
        properties = pika.BasicProperties(delivery_mode=2 if persistent else 1, headers=headers)
        try:
            self._channel.basic_publish("", name, body, properties, mandatory=True)
        except pex.UnroutableError:
            raise TransportError(f"queue {name!r} does not exist") from None
        except pex.NackError:
            raise _Nacked(name) from None

    def _consume(self, name: str) -> None:
        if name not in self._inboxes:
            self._inboxes[name] = collections.deque()
            self._start_consumer(name)

    def _start_consumer(self, name: str) -> None:
        generation = self.generation

        def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            self._on_message(name, generation, method.delivery_tag, properties.headers or {}, body)

        self._channel.basic_consume(name, on_message, auto_ack=False)

    def _ack(self, generation: int, tags: list[int]) -> None:
        if generation != self.generation or self._channel is None:
            return  # the old connection's deliveries come back; handlers drop the duplicates
        for tag in tags:
            self._channel.basic_ack(tag)

    def _on_message(self, name: str, generation: int, tag: int, headers: dict, body: bytes) -> None:
        outcome = self._chunks.take(name, tag, headers, body, time.monotonic())
        if isinstance(outcome, Whole):
            self._deliver(Delivery(name, outcome.body, (generation, outcome.tags)))
        elif isinstance(outcome, Refused):
            self._reject(outcome)

    def _deliver(self, delivery: Delivery) -> None:
        with self._cv:
            self._inboxes[delivery.queue].append(delivery)
            if self._waiters:
                self._cv.notify_all()

    def _expire_partials(self) -> None:
        for refused in self._chunks.expire(time.monotonic()):
            self._reject(refused)

    def _reject(self, refused: Refused) -> None:
        for tag in refused.tags:
            self._channel.basic_ack(tag)  # refused for good: redelivering it would not make it valid
        self._on_reject_of.get(refused.queue, self._on_reject)(refused.reason, refused.detail)


def _forward(done: Future, caller: Future) -> None:
    """Hand a retried operation's outcome to the future its caller waits on."""
    if done.cancelled():
        caller.set_exception(TransportError("operation cancelled"))
    elif done.exception() is not None:
        caller.set_exception(done.exception())
    else:
        caller.set_result(done.result())
