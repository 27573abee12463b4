"""Record writers: their base over an :class:`~.output.Output` (:class:`FileWriter`), the
native format and JSON lines (pcapng: :mod:`.pcapng`)."""

from __future__ import annotations

import json
import zlib
from typing import BinaryIO, Protocol

from agent.model import FlowEnd, TrafficChunk
from agent.sinks.record.files import RecordFiles
from agent.sinks.record.format import (
    BODY,
    CHUNK,
    DIRS,
    END,
    FILE_HEADER,
    FORMATS,
    FRAME,
    MAGIC,
    VERSION,
    chunk_json,
)
from agent.sinks.record.ledger import FlowLedger
from agent.sinks.record.output import Output

__all__ = ["FileWriter", "JsonLinesWriter", "NativeWriter", "RecordWriter", "make_writer"]


class RecordWriter(Protocol):
    """What the mirror's record path writes to."""

    def write(self, chunk: TrafficChunk, data: bytes) -> None: ...

    def flow_end(self, end: FlowEnd) -> None: ...

    def flush(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """``records`` and ``recorded_bytes`` written, plus ``record_*`` losses if any (a
        :class:`FileWriter` adds its ``connections*``)."""
        ...


class FileWriter:
    """A record writer over an :class:`~.output.Output` (the formats subclass it, implementing
    :meth:`_write` and :meth:`_flow_end`; every record they make is settled in
    :attr:`ledger` by the :class:`~.output.Output`, or by :meth:`~.output.Output.settled`).

    Connections (:mod:`~agent.sinks.record.ledger`): :meth:`write` and :meth:`flow_end`
    hand a record of the flow to :attr:`ledger`, unless a stage in front of this writer
    hands them (:meth:`fronted`). :meth:`close` flushes and drops what is still in flight
    as ``shutdown``; the file itself stays open for its owner to close.
    """

    #: The bytes every file of the format starts with.
    preamble = b""

    def __init__(self, out: BinaryIO | RecordFiles) -> None:
        #: The connections of this recording.
        self.ledger = FlowLedger()
        self._handing = True
        self._out = Output(out, self.preamble, self.ledger)

    def fronted(self) -> FlowLedger:
        """A stage in front of this writer (a background writer thread) hands the records
        over from now on and counts them as handed itself; this writer only settles them.
        Returns the ledger they share."""
        self._handing = False
        return self.ledger

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        """One chunk (``data``: its bytes after the hooks)."""
        if self._handing:
            self.ledger.hand(chunk.flow_id)
        self._write(chunk, data)

    def flow_end(self, end: FlowEnd) -> None:
        """The end of a flow that has records: none of the flow follows."""
        if self._handing:
            self.ledger.hand(end.flow_id)
        self._flow_end(end)

    def _write(self, chunk: TrafficChunk, data: bytes) -> None:
        raise NotImplementedError

    def _flow_end(self, end: FlowEnd) -> None:
        self._out.settled(end.flow_id, end=True)  # not written by this format

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        """Flush, then drop the connections still in flight as ``shutdown`` (the end of a
        run). The file stays open; a later record starts the accounting afresh."""
        try:
            self.flush()
        finally:
            self.ledger.shutdown()

    def tick(self) -> float | None:
        """See :meth:`~.output.Output.tick`."""
        return self._out.tick()

    def stats(self) -> dict[str, int]:
        """The :class:`~.output.Output`'s counts and the ledger's ``connections*``."""
        return {**self._out.stats(), **self.ledger.stats()}


class NativeWriter(FileWriter):
    """Writes the native format to a binary file-like object, or to the files of a rotated
    or compressed recording (each file starts with the header, with its first record)."""

    preamble = FILE_HEADER.pack(MAGIC, VERSION, 0, 0)

    def _write(self, chunk: TrafficChunk, data: bytes) -> None:
        fa = chunk.from_addr.encode()
        ta = chunk.to_addr.encode()
        head = BODY.pack(CHUNK, DIRS[chunk.direction], len(fa), len(ta), 0, chunk.flow_id,
                         chunk.seen_at, chunk.gap_bytes) + fa + ta
        self._record(head, data, len(data), chunk.flow_id)

    def _flow_end(self, end: FlowEnd) -> None:
        head = BODY.pack(END, 0, 0, 0, 0, end.flow_id, 0.0, end.trailing_gap)
        self._record(head, end.reason.encode(), -1, end.flow_id)

    def _record(self, head: bytes, data: bytes, data_len: int, flow: int) -> None:
        """One record of ``flow``: its frame (the length and CRC of ``head`` and ``data`` together),
        ``head``, ``data`` (after the file header in a new file). Data of
        :data:`_COPY_BELOW` bytes or more goes as it is, a piece of its own (one copy less,
        one CRC call more); smaller data is copied into the record."""
        out = self._out
        if out.error is not None:
            out.add(b"", b"", data_len, flow)  # counted as lost
            return
        if out.rotating:
            out.begin(FRAME.size + len(head) + len(data))
        if len(data) < _COPY_BELOW:
            body = head + data
            record = FRAME.pack(len(body), zlib.crc32(body)) + body
            data = b""
        else:
            record = FRAME.pack(len(head) + len(data), zlib.crc32(data, zlib.crc32(head))) + head
        out.add(record, data, data_len, flow)


#: Record data shorter than this is copied into its record: cheaper than a second CRC call
#: and a piece of its own in the ``writev``.
_COPY_BELOW = 1024


class JsonLinesWriter(FileWriter):
    """One JSON object per chunk, one per line; flow ends are not written."""

    def _write(self, chunk: TrafficChunk, data: bytes) -> None:
        out = self._out
        line = b"" if out.error is not None else json.dumps(
            chunk_json(chunk, data), separators=(",", ":")).encode() + b"\n"
        if line and out.rotating:
            out.begin(len(line))
        out.add(line, b"", len(data), chunk.flow_id)


def make_writer(out: BinaryIO | RecordFiles, fmt: str) -> FileWriter:
    """The writer of format ``fmt`` (one of :data:`FORMATS`) to ``out``: one file, or the
    files of a rotated or compressed recording."""
    if fmt == "native":
        return NativeWriter(out)
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    if fmt == "pcapng":
        from agent.sinks.record.pcapng import PcapngWriter

        return PcapngWriter(out)
    raise ValueError(f"unknown record format {fmt!r} (expected one of {', '.join(FORMATS)})")
