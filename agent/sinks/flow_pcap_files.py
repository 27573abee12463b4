"""The file side of per-flow pcap files (``--flow-pcap-dir``): a thread of its own, so no
open, write or close ever runs on the capture loop (see :mod:`agent.sinks.flow_pcap` for
the packets, the names and the capture side).

Hand-over. The capture thread (:class:`~agent.sinks.flow_pcap.FlowPcapSaver`) hands over
:class:`Item`\\ s: a flow's ready pcap records (at most about ``buffer_bytes`` each), or its
end. The queue is an :class:`agent.mirror.handoff.Handoff` (``flow_pcap``). Live
(:attr:`~agent.sinks.flow_pcap.FlowPcapConfig.live`) its policy is *drop*: the capture
thread never waits; a record item that does not fit is refused (``put`` returns False) and
the capture side drops the flow (counted there); an end is empty and always fits. Offline
it is *pause*: the capture thread waits for room, nothing is refused.
Bytes count against :attr:`FlowPcapConfig.queue_budget` from the put until the item is
written (handed to its file's buffer or to the file).

Files (this thread only). At most ``max_open`` files are open: writing to another one
closes the least recently written (its buffer written out), and a closed file is opened
again in append mode when its flow has more packets. Each open file's buffer
(:class:`io.BufferedWriter`) holds at most ``buffer_bytes``; longer writes go straight
through. A file is created exclusively, never over another (``NAME.1.pcap``, ...). With
``gzip`` every opening starts another gzip member (level 1).

Faults stay local: a file that cannot be created or written is closed, its flow's later
packets are counted (``packets_lost``), not saved, and the failure is logged once per
outage. Anything else this thread raises (a bug) stops it; :meth:`FlowPcapWriter.put` or
:meth:`FlowPcapWriter.close` raises it on the capture thread.

Stopping: :meth:`FlowPcapWriter.close` lets the thread write everything queued, close every
file and end, and waits for it: nothing handed over is lost on a clean stop (end of input,
SIGTERM). A later item starts the thread again.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import structlog

from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.sinks.outage import OutageLog

if TYPE_CHECKING:
    from agent.sinks.flow_pcap import FlowPcapConfig

__all__ = ["WRITER_COUNTERS", "FlowPcapWriter", "Item"]

log = structlog.get_logger("agent.flow_pcap")

_MAX_NUMBER = 1000
#: The counters this thread writes (see :mod:`agent.metrics`, stage ``flowpcap``).
WRITER_COUNTERS = ("files", "files_completed", "files_reopened", "files_evicted",
                   "files_failed", "packets", "written_bytes", "packets_lost",
                   "open_files_peak")


class Item(NamedTuple):
    """What the capture thread hands over: records of a flow, or (``end``) its end."""

    flow_id: int
    name: str
    """The flow's file name (used when its file is created)."""
    data: bytes | bytearray = b""
    """Whole pcap records (header and packet), in capture order."""
    packets: int = 0
    packet_bytes: int = 0
    """Packet bytes in ``data`` (without the record headers): ``written_bytes``."""
    end: bool = False
    complete: bool = True
    """With ``end``: every packet of the flow was handed over (its file is complete)."""


def _create(directory: Path, name: str) -> tuple[int, str]:
    """A new file for ``name`` in ``directory``, never an existing one: (fd, its name)."""
    stem, dot, ext = name.partition(".pcap")
    for n in range(_MAX_NUMBER):
        candidate = name if n == 0 else f"{stem}.{n}{dot}{ext}"
        with contextlib.suppress(FileExistsError):
            return os.open(directory / candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                           0o644), candidate
    raise FileExistsError(errno.EEXIST, f"{name} and {_MAX_NUMBER - 1} numbered names exist")


def _reason(e: OSError) -> str:
    """An outage's reason: the error's name (``ENOSPC``), else its text."""
    return errno.errorcode.get(e.errno or 0, "") or (e.strerror or type(e).__name__)


class _File:
    """One flow's file: its name, and while open, the buffered file (gzip over it)."""

    __slots__ = ("failed", "name", "raw", "stream")

    def __init__(self, name: str) -> None:
        self.name = name
        self.raw: BinaryIO | None = None  # an io.BufferedWriter of ``buffer_bytes``
        self.stream: BinaryIO | gzip.GzipFile | None = None  # ``raw``, or gzip over it
        self.failed = False

    def attach(self, fd: int, gz: bool, buffer_bytes: int) -> None:
        raw = self.raw = os.fdopen(fd, "wb", buffering=buffer_bytes)
        self.stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1,
                                    mtime=0) if gz else raw

    def close(self) -> None:
        """Write what is buffered and close (the gzip member ends); OSError goes up, the
        file is closed whatever happens."""
        stream, raw, self.stream, self.raw = self.stream, self.raw, None, None
        try:
            if stream is not None and stream is not raw:
                stream.close()
        finally:
            if raw is not None:
                raw.close()


class _Files:
    """Every flow's file (see the module docstring); the writer thread's alone."""

    def __init__(self, config: FlowPcapConfig, header: bytes, counters: dict[str, int]) -> None:
        self.config = config
        self._header = header
        self.counters = counters
        self._flows: dict[int, _File] = {}
        self._open: OrderedDict[int, _File] = OrderedDict()  # least recently written first
        self._outage = OutageLog(log, "flow pcap file failed; that flow's packets are not "
                                 "saved, the others go on", "flow pcap files work again",
                                 directory=str(config.directory))

    @property
    def open_files(self) -> int:
        return len(self._open)

    def apply(self, item: Item) -> None:
        """Write one item: records into its flow's file (created or reopened first), or the
        flow's end (its file closed, nothing more kept)."""
        if item.end:
            self._end(item)
            return
        fid = item.flow_id
        f = self._flows.get(fid)
        if f is None:
            f = self._flows[fid] = self._new(fid, item.name)
        elif not f.failed and f.stream is None:
            self._reopen(fid, f)
        c = self.counters
        if f.failed or f.stream is None:
            c["packets_lost"] += item.packets
            return
        self._open.move_to_end(fid)
        try:
            f.stream.write(item.data)
        except OSError as e:
            c["packets_lost"] += item.packets
            self._fail(fid, f, e)
            return
        c["packets"] += item.packets
        c["written_bytes"] += item.packet_bytes

    def close_all(self) -> None:
        """Close every open file (flows not ended keep what was written) and forget them."""
        for fid, f in list(self._open.items()):
            del self._open[fid]
            self._close(fid, f)
        self._flows.clear()

    def _end(self, item: Item) -> None:
        f = self._flows.pop(item.flow_id, None)
        if f is None:
            return
        if self._open.pop(item.flow_id, None) is not None:
            self._close(item.flow_id, f)
        if not f.failed and item.complete:
            self.counters["files_completed"] += 1

    def _new(self, fid: int, name: str) -> _File:
        """The file of a new flow: named, created (never over another), open, its header
        buffered."""
        f = _File(name)
        try:
            self._make_room()
            fd, f.name = _create(self.config.directory, name)
            f.attach(fd, self.config.gzip, self.config.buffer_bytes)
            assert f.stream is not None
            f.stream.write(self._header)
        except OSError as e:
            self._fail(fid, f, e)
            return f
        self.counters["files"] += 1
        self._outage.recovered()
        self._add_open(fid, f)
        return f

    def _reopen(self, fid: int, f: _File) -> None:
        """Open a file the bound closed again, to append (never creating it anew)."""
        try:
            self._make_room()
            f.attach(os.open(self.config.directory / f.name, os.O_WRONLY | os.O_APPEND),
                     self.config.gzip, self.config.buffer_bytes)
        except OSError as e:
            self._fail(fid, f, e)
            return
        self.counters["files_reopened"] += 1
        self._add_open(fid, f)

    def _add_open(self, fid: int, f: _File) -> None:
        self._open[fid] = f
        if len(self._open) > self.counters["open_files_peak"]:
            self.counters["open_files_peak"] = len(self._open)

    def _make_room(self) -> None:
        """Close least recently written files until one more may open."""
        while len(self._open) >= self.config.max_open:
            fid, f = self._open.popitem(last=False)
            self.counters["files_evicted"] += 1
            self._close(fid, f)

    def _close(self, fid: int, f: _File) -> None:
        try:
            f.close()
        except OSError as e:
            self._fail(fid, f, e)

    def _fail(self, fid: int, f: _File, e: OSError) -> None:
        """``f`` cannot be written: closed quietly, its flow's later packets only counted."""
        self._open.pop(fid, None)
        if not f.failed:
            f.failed = True
            self.counters["files_failed"] += 1
            self._outage.failed(_reason(e), file=f.name, error=e.strerror or str(e))
        with contextlib.suppress(OSError):
            f.close()


class FlowPcapWriter:
    """The writer thread and its queue (see the module docstring).

    ``header`` starts every new file. :meth:`put` and :meth:`close` are called from one
    thread (the capture thread); :meth:`stats` and :attr:`open_files` from any.
    """

    def __init__(self, config: FlowPcapConfig, header: bytes) -> None:
        self.counters: dict[str, int] = dict.fromkeys(WRITER_COUNTERS, 0)  # this thread's
        self._files = _Files(config, header, self.counters)
        policy = Policy.DROP if config.live else Policy.PAUSE
        self._handoff: Handoff[Item] = Handoff("flow_pcap", config.queue_budget, policy,
                                               release_on_take=False)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def open_files(self) -> int:
        """Files open now (at most ``config.max_open``)."""
        return self._files.open_files

    def put(self, item: Item) -> bool:
        """Hand ``item`` over; False if it does not fit (live: the queue is full; offline it
        waits for room). Raises what stopped the writer thread, once."""
        self._raise()
        if self._thread is None and self._handoff.closed:
            self._handoff.reopen()  # closed earlier: a new run, a new thread
        if not self._handoff.put(item, len(item.data), "queue_full"):
            self._raise()  # refused because the thread stopped: say why
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flow-pcap-writer",
                                            daemon=True)
            self._thread.start()
        return True

    def close(self) -> None:
        """Write everything queued, close every file, stop the thread and wait for it.
        Raises what stopped the thread, if anything did; calling it again does nothing."""
        thread = self._thread
        self._handoff.close()
        if thread is not None:
            thread.join()
            self._thread = None
        self._raise()

    def stats(self) -> dict[str, int]:
        """This thread's counters and ``open_files``."""
        return {**self.counters, "open_files": self._files.open_files}

    def handoff_stats(self) -> HandoffStats:
        """The queue's counters (see :mod:`agent.mirror.handoff`)."""
        return self._handoff.stats()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        handoff = self._handoff
        try:
            while batch := handoff.take_all(None):  # empty only once closed and drained
                for item in batch:
                    self._files.apply(item)
                    handoff.release(len(item.data))
        except BaseException as e:  # a bug: handed to the capture thread
            self._error = e
            handoff.close()
            handoff.discard()
        finally:
            self._files.close_all()
