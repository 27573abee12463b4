"""Capture files submitted at run time (``POST /pcap``): a job queue and a live packet source.

:class:`PcapIngest` holds a bounded queue of jobs and one reader thread (``pcap-reader``).
The reader takes the jobs in order, reads each file with
:class:`~agent.sources.files.pcapfile.PcapFileSource` and hands its segment batches to the
mirror thread through a :class:`~agent.mirror.handoff.Handoff` (``pcap_ingest``,
:attr:`Policy.PAUSE`): when the mirror is behind, the reader waits; nothing is dropped.

Timestamps are rebased so that the file's first packet is "now" (the live pipeline ages flows
on wall-clock time: old timestamps would time every flow out at once), and never run ahead of
the wall clock: a file read faster than it was captured is compressed in time, so the
reassembler's clock (the newest timestamp it saw) never jumps past live traffic sharing it.

The ingest is itself a :class:`~agent.sources.LiveSource`: :meth:`PcapIngest.batches` yields
batches as they come and an empty one about every ``idle_tick`` seconds when idle; it ends once
the ingest is closed and what was read is taken. :meth:`PcapIngest.poll` takes one batch
without waiting (for :class:`agent.control.merge.MergedSource`).

A file is opened when it is submitted (:func:`agent.control.pcapdir.open_inside` for ``POST
/pcap``: by descriptor, below the pcap directory, no symbolic link followed, regular files
only) and the job keeps
that descriptor: what the file's name points to later (another file, a symbolic link, a FIFO)
changes nothing. It is read in chunks, never mapped: a file truncated after it was submitted
is cut short where it ends, and the reader thread goes on with the next job.

Jobs: ``queued → running → done | failed``. A job is ``done`` once the mirror has taken every
segment of the file (flows the file leaves open stay open until they end or idle out, as live
ones do). A file that cannot be opened, is cut short or damaged (``bad_frames``), or is still
being read when the ingest closes, is ``failed`` with the reason; the service goes on.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import structlog

from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment
from agent.sources import SourceError
from agent.sources.files.capstream import Capture
from agent.sources.files.pcapfile import PcapFileSource

__all__ = ["IngestClosed", "Job", "PcapIngest", "QueueFull"]

log = structlog.get_logger("agent.ingest")

JobState = Literal["queued", "running", "done", "failed"]
#: What a segment counts against the hand-off budget besides its payload (object overhead), so
#: batches of pure ACKs are bounded too.
SEGMENT_OVERHEAD = 128
_KEEP_FINISHED = 256  # finished jobs remembered for GET /pcap/<id>


class QueueFull(Exception):
    """The job queue is full (``POST /pcap`` answers 429)."""


class IngestClosed(Exception):
    """The ingest is shutting down and takes no more jobs."""


@dataclass
class Job:
    """One submitted file and what became of it. Counters grow while it is read:
    ``packets`` (frames read), ``segments`` and ``bytes`` (TCP payload) handed to the mirror,
    ``skipped`` (frames that were not TCP segments or could not be decoded), ``bad_frames``."""

    id: str
    path: str
    state: JobState = "queued"
    error: str | None = None
    packets: int = 0
    segments: int = 0
    bytes: int = 0
    skipped: int = 0
    bad_frames: int = 0
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    #: The file, open since it was submitted; the reader takes it (None from then on).
    capture: Capture | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "state": self.state, "error": self.error,
                "packets": self.packets, "segments": self.segments, "bytes": self.bytes,
                "skipped": self.skipped, "bad_frames": self.bad_frames,
                "submitted_at": self.submitted_at, "started_at": self.started_at,
                "finished_at": self.finished_at}


class _Item(NamedTuple):
    """A batch of ``job``'s segments, or (``segments`` None) the end of ``job`` with its error."""

    job: Job
    segments: list[Segment] | None
    error: str | None = None


class _JobSource(PcapFileSource):
    """A one-file source that keeps why the file was cut short (the job's error)."""

    error: str | None = None

    def _cut_short(self, path: Path, reason: str, **where: int) -> None:
        at = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in where.items())
        self.error = f"cut short ({at}): {reason}" if at else f"cut short: {reason}"
        super()._cut_short(path, reason, **where)


class PcapIngest:
    """The job queue, its reader thread and the live source it feeds (see the module doc).

    ``max_queued``: jobs waiting (not counting the one being read) before :meth:`submit`
    raises :class:`QueueFull`. ``budget``: bytes the hand-off to the mirror holds before the
    reader waits. Threads: :meth:`submit`, :meth:`job`, :meth:`stats` from any thread;
    :meth:`batches`, :meth:`poll`, :meth:`drain` from the consumer (mirror) thread only.
    """

    def __init__(self, max_queued: int = 8, budget: int = 8 << 20, idle_tick: float = 0.05,
                 max_silence: float = 10.0) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, not {max_queued}")
        self.max_queued = max_queued
        self._idle_tick = idle_tick
        self._handoff: Handoff[_Item] = Handoff("pcap_ingest", budget, Policy.PAUSE)
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._closed = False
        self._totals: Counter[str] = Counter()  # stats of the files read so far
        self._current: dict[str, int] = {}  # stats of the file being read (a snapshot)
        self._ids = itertools.count(1)
        #: The reader thread's progress (for ``/healthz``).
        self.heartbeat = Heartbeat("pcap-reader", max_silence)
        self._thread = threading.Thread(target=self._run, name="pcap-reader", daemon=True)
        self.heartbeat.start(self._thread)
        self._thread.start()

    # ---------------------------------------------------------------- any thread

    def submit(self, path: Path | Capture) -> Job:
        """Queue a capture file: one already open (:func:`open_inside`; the ingest owns it
        from here on, and closes it if refused) or a path, opened now (a regular file only).
        Raises :class:`QueueFull`, :class:`IngestClosed` or, for a path,
        :class:`~agent.sources.SourceError`."""
        capture = path if isinstance(path, Capture) else Capture.open(path, regular=True)
        try:
            job = self._enqueue(capture)
        except BaseException:
            capture.close()
            raise
        log.info("capture file queued", job=job.id, file=job.path)
        return job

    def _enqueue(self, capture: Capture) -> Job:
        with self._lock:
            if self._closed:
                raise IngestClosed("the agent is shutting down")
            if len(self._queue) >= self.max_queued:
                self._totals["pcap_jobs_rejected"] += 1
                raise QueueFull(f"{len(self._queue)} files are already queued "
                                f"(at most {self.max_queued}); try again later")
            job = Job(f"{next(self._ids)}-{secrets.token_hex(4)}", str(capture.path),
                      capture=capture)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        return job

    def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's state and counters (:meth:`Job.as_dict`); None if unknown or forgotten."""
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.as_dict()

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def stats(self) -> dict[str, int]:
        """The files' source counters (``frames``, ``decoded``, ``skipped_*`` ...) summed,
        and ``pcap_jobs_{done,failed,rejected}`` and ``pcap_jobs_queued``."""
        with self._lock:
            out = Counter(self._totals)
            out.update(self._current)  # (not "+", which drops zeros)
            for key in ("pcap_jobs_done", "pcap_jobs_failed", "pcap_jobs_rejected"):
                out.setdefault(key, 0)
            out["pcap_jobs_queued"] = len(self._queue)
            return dict(out)

    def handoffs(self) -> list[HandoffStats]:
        return [self._handoff.stats()]

    def close(self) -> None:
        """Take no more jobs, stop reading (the job being read fails), fail the queued ones.
        What was already handed over stays for :meth:`batches`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._queue:
                self._finish(self._queue.popleft(), "the agent stopped before reading it")
            self._lock.notify_all()
        self._handoff.close()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    # ---------------------------------------------------------------- consumer (mirror)

    def batches(self) -> Iterator[list[Segment]]:
        """Batches as they come; ``[]`` every ``idle_tick`` seconds when idle; ends once
        closed and empty."""
        while True:
            batch = self._take(self._idle_tick)
            if batch is not None:
                yield batch
            elif self._handoff.closed and not len(self._handoff):
                return
            else:
                yield []

    def poll(self) -> list[Segment] | None:
        """One batch if one is ready, else None; never waits."""
        return self._take(0)

    def drain(self) -> list[Segment]:
        """Stop reading; everything handed over and not taken yet, in order."""
        self._handoff.close()
        out: list[Segment] = []
        for item in self._handoff.leftovers():
            if item.segments is None:
                self._end(item)
            else:
                out.extend(item.segments)
        return out

    def _take(self, timeout: float) -> list[Segment] | None:
        while True:
            item = self._handoff.take(timeout)
            if item is None:
                return None
            if item.segments is not None:
                return item.segments
            self._end(item)  # every batch before it was taken, and processed

    def _end(self, item: _Item) -> None:
        with self._lock:
            self._finish(item.job, item.error)

    # ---------------------------------------------------------------- reader thread

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            self._read(job)
        self.heartbeat.stop()

    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._queue and not self._closed:
                self.heartbeat.beat()
                self._lock.wait(1.0)
            if self._closed:
                return None
            job = self._queue.popleft()
            job.state = "running"
            job.started_at = time.time()
            return job

    def _read(self, job: Job) -> None:
        """Read ``job``'s file into the hand-off; its end (with the error, if any) follows."""
        log.info("reading capture file", job=job.id, file=job.path)
        error: str | None = None
        src: _JobSource | None = None
        capture, job.capture = job.capture, None
        try:
            if capture is None:
                raise SourceError(f"{job.path}: the file was not opened")
            src = _JobSource([capture])
            offset: float | None = None
            for batch in src.batches():
                if not batch:
                    continue
                if offset is None:
                    offset = time.time() - batch[0].ts
                if not self._hand_over(job, batch, offset, src):
                    error = "the agent stopped before the end of the file"
                    break
            error = error or src.error or _damage(src)
        except SourceError as e:
            error = str(e)
        except Exception as e:  # a bug in decoding must cost this file only
            log.exception("reading a capture file failed", job=job.id, file=job.path)
            error = f"{type(e).__name__}: {e}"
        finally:
            if src is not None:
                src.close()
                with self._lock:
                    self._totals.update(src.stats())
                    self._current = {}
        if not self._handoff.put(_Item(job, None, error), 0):  # closed: nobody will take it
            with self._lock:
                self._finish(job, error or "the agent stopped before the end of the file")

    def _hand_over(self, job: Job, batch: list[Segment], offset: float,
                   src: PcapFileSource) -> bool:
        """Rebase ``batch``'s timestamps and hand it over, waiting for room (beating while
        it waits). False once the ingest is closed."""
        wall = time.time()
        payload = 0
        for seg in batch:
            ts = seg.ts + offset
            seg.ts = ts if ts < wall else wall
            payload += len(seg.payload)
        while not self._handoff.wait_for_room(1.0):
            if self._handoff.closed:
                return False
            self.heartbeat.beat()
        self.heartbeat.beat()
        if not self._handoff.put(_Item(job, batch), payload + SEGMENT_OVERHEAD * len(batch)):
            return False
        stats = src.stats()
        with self._lock:
            self._current = stats
            job.segments += len(batch)
            job.bytes += payload
            job.packets = stats["frames"]
            job.skipped = stats["frames"] - stats["decoded"] - stats["filtered"]
            job.bad_frames = stats["bad_frames"]
        return True

    # ---------------------------------------------------------------- internals (locked)

    def _finish(self, job: Job, error: str | None) -> None:
        if job.capture is not None:  # never read
            job.capture.close()
            job.capture = None
        if job.state in ("done", "failed"):
            return
        job.state = "failed" if error else "done"
        job.error = error
        job.finished_at = time.time()
        self._totals["pcap_jobs_failed" if error else "pcap_jobs_done"] += 1
        say = log.warning if error else log.info
        say("capture file finished", job=job.id, file=job.path, state=job.state, error=error,
            segments=job.segments, bytes=job.bytes)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in ("done", "failed")]
        for k in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            del self._jobs[k]


def _damage(src: PcapFileSource) -> str | None:
    """Why a file read to its end still failed: it was cut short, or frames were damaged."""
    stats = src.stats()
    if stats["cut_short_files"]:
        return "cut short (see the agent's log for where)"
    bad = stats["bad_frames"]
    return f"{bad} damaged frames skipped" if bad else None
