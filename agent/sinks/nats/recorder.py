"""The record writer of ``--record nats://HOST:PORT/SUBJECT``: the capture thread hands
records over, a thread of its own publishes them (:mod:`agent.sinks.nats.publisher`)."""

from __future__ import annotations

import threading

import structlog

from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.model import FlowEnd, TrafficChunk
from agent.sinks.nats.client import NatsAuthError
from agent.sinks.nats.gaps import GapLedger
from agent.sinks.nats.publisher import CHUNK, END, REASONS, Item, Publisher, Settings
from agent.sinks.nats.url import NatsTarget
from agent.sinks.record.ledger import FlowLedger

__all__ = ["NatsRecorder"]

log = structlog.get_logger("agent.record.nats")


class NatsRecorder:
    """Publishes every record to a JetStream stream, one message per record (the native
    record as the body, the flow's metadata in headers: :mod:`agent.sinks.nats.message`).

    The capture thread only queues: an :class:`agent.mirror.handoff.Handoff` named ``record_nats``
    of ``budget`` bytes (records queued, and published but not acknowledged yet). ``live``
    (a live capture): the *drop* policy, so capture never waits: a record that does not fit
    is dropped, counted as ``queue_full`` and owed to its flow's next record as a gap.
    Offline (not ``live``) the capture thread waits for room instead, as it waits for the
    disk when recording to a file; the publisher drops what it cannot publish, so the wait
    is bounded by the connect and acknowledgement timeouts.

    A broker that is down at start or goes away costs only the recording: records are
    dropped and counted (``broker_down``) and reconnects retried with backoff; the first
    failure of an outage is logged, and the recovery.

    The thread starts at once, so the stream is in place (and a broker that is down is
    reported) before the first record; after :meth:`close` the next record starts it again.
    The constructor waits for the first connection attempt (at most about four
    ``connect_timeout``: TCP, TLS, INFO, PONG): if the server refused the agent (a wrong or
    missing credential, TLS that failed) it stops the thread and raises
    :class:`~agent.sinks.nats.client.NatsAuthError` (``URL: why``, no secret). A refusal
    later (credentials revoked or rotated on the server mid-run) is an outage like a broker
    that went down: records dropped as ``broker_down``, one log line with the cause,
    reconnects with backoff (files re-read each time), and publishing resumes once the
    server accepts the agent again.
    :meth:`close` (the mirror calls it at the end
    of a run, before the summary) publishes what is queued, waits up to ``drain_timeout``
    for the acknowledgements due, counts what is still unacknowledged as ``shutdown``,
    closes the connection and joins the thread. All calls
    but :meth:`stats` and :meth:`handoffs` come from one thread (the capture thread).

    Connections (:mod:`agent.sinks.record.ledger`): each record is handed to :attr:`flows` as
    it is queued; a flow is completed once JetStream acknowledged every message of it, its
    end included, dropped (with the ``nats_dropped_*`` reason of its first record lost)
    otherwise; :meth:`close` drops what is still in flight as ``shutdown``.
    """

    def __init__(self, target: NatsTarget, budget: int = 256 << 20, live: bool = True,
                 settings: Settings | None = None) -> None:
        self.target = target
        self._settings = settings or Settings()
        self._handoff: Handoff[Item] = Handoff(
            "record_nats", budget, Policy.DROP if live else Policy.PAUSE,
            release_on_take=False)
        #: The connections recorded (see the class doc).
        self.flows = FlowLedger(REASONS)
        self._publisher = Publisher(target, self._handoff, self._settings, self.flows)
        self._thread: threading.Thread | None = None
        self._ledger = GapLedger()
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._start()
        self._check_accepted()

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        """Queue ``chunk`` with ``data`` (never waits when ``live``)."""
        chunk = self._ledger.charge(chunk)
        self.flows.hand(chunk.flow_id)
        if not self._put((CHUNK, chunk, data), len(data)):
            self._ledger.owe(chunk, len(data))
            self.flows.done(chunk.flow_id, lost="queue_full")

    def flow_end(self, end: FlowEnd) -> None:
        """Queue the end of a flow (with any gap owed to it)."""
        self.flows.hand(end.flow_id)
        if not self._put((END, self._ledger.settle_end(end), b""), 0):
            self.flows.done(end.flow_id, end=True, lost="queue_full")

    def flush(self) -> None:
        """Wait until everything queued is published and acknowledged or dropped (at most
        about ``ack_timeout`` for each, ``drain_timeout`` in all)."""
        s = self._settings
        deadline = threading.Event()
        timer = threading.Timer(s.drain_timeout + s.ack_timeout + s.connect_timeout,
                                deadline.set)
        timer.start()
        try:
            while self._handoff.queued_bytes or len(self._handoff) or (
                    self._publisher.counts["nats_inflight"]):
                if self._thread is None or not self._thread.is_alive() or deadline.wait(0.01):
                    break
        finally:
            timer.cancel()
        self._raise()

    def close(self) -> None:
        """Publish what is queued, wait (bounded) for its acknowledgements, close the
        connection and stop the thread (see the class doc). Calling it again does nothing
        more."""
        thread = self._thread
        if thread is None:
            return
        self._handoff.close()
        self._publisher.wake(force=True)
        s = self._settings
        thread.join(s.connect_timeout + s.drain_timeout + 10)
        if thread.is_alive():
            log.error("NATS recording: publisher thread did not stop", target=self.target.url)
        self._thread = None
        self.flows.shutdown()
        self._raise()

    def stats(self) -> dict[str, int]:
        """``records``/``recorded_bytes`` acknowledged by JetStream, ``nats_*`` connection
        counters and gauges, and ``nats_dropped_{records,bytes}_<reason>`` for every reason
        (:data:`~agent.sinks.nats.publisher.REASONS`), and the ``connections*``."""
        out = dict(self._publisher.counts)
        out["nats_dropped_records_queue_full"] = self.dropped_records
        out["nats_dropped_bytes_queue_full"] = self.dropped_bytes
        out.update(self.flows.stats())
        return out

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self._handoff.stats()]

    def _raise(self) -> None:
        error = self._publisher.error
        if error is not None:
            self._publisher.error = None
            raise error

    def _check_accepted(self) -> None:
        """Wait for the first connection attempt; NatsAuthError if the server refused it."""
        self._publisher.first_attempt.wait(4 * self._settings.connect_timeout + 1)
        self._publisher.stop_watching_start()
        why = self._publisher.refused
        if why is not None:
            self.close()
            raise NatsAuthError(self.target.url, why)

    def _start(self) -> None:
        if self._handoff.closed:
            self._handoff.reopen()  # closed by the last run: a new thread
        self._thread = threading.Thread(target=self._publisher.run, name="record-nats",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Item, size: int) -> bool:
        """Queue one record; False if it was dropped (the queue is full)."""
        self._raise()
        if self._thread is None:
            self._start()
        if not self._handoff.put(item, size, "queue_full"):
            if not self.dropped_records:
                log.warning("NATS recording cannot keep up; dropping records (counted, and "
                            "marked as gaps in the recording)", target=self.target.url)
            self.dropped_records += 1
            self.dropped_bytes += size
            return False
        self._publisher.wake()
        return True

