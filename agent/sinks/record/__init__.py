"""Recordings: the native framed binary format, JSON lines, and a reader for the native one.

Native format, version 1 (all integers little-endian)::

    file header   8s magic b"MIRRORAG"  u16 version (1)  u16 flags (0)  u32 reserved (0)
    record        u32 body_len  u32 crc32(body)  body
    body          u8 type (1 chunk, 2 flow end)  u8 direction (0 unknown, 1 to_observed,
                  2 from_observed)  u16 from_len  u16 to_len  u16 reserved
                  u64 flow_id  f64 seen_at  u64 gap_bytes  from  to  data
                  (for a flow end, ``data`` is the reason in ASCII and gap_bytes the
                  trailing gap)

A reader skips a corrupt record (bad CRC) when the record after it is whole, and otherwise
stops there and reports the rest as ignored (``truncated_bytes``): a recording cut by a crash
keeps everything before the cut.

Writers count what reached the file (``records``, ``recorded_bytes``), and the connections
whose records all reached it, or not (``connections*``: :mod:`.ledger`). A write error fails
only that recording: one error line names the file, the file is closed, and every later
record is counted as lost (``record_failed_*``) instead of written. The one exception is a
broken pipe on stdout (its reader went away): that is raised, for a quiet exit.

A recording may be split into files by size and/or time, trimmed to a total size, and
compressed (gzip, zstd): see :mod:`.files` and :mod:`.codec`. ``pcapng`` writes the
connections as synthesised packets for Wireshark (:mod:`.pcapng`).

The pieces: :mod:`.format` (the format's constants, JSON lines objects), :mod:`.output` (a
file, or rotated files, with exact accounting), :mod:`.files` (names, rotation, total size),
:mod:`.codec` (compression, and reading a compressed file back), :mod:`.writers` (the
writers), :mod:`.pcapng`, :mod:`.background` (a writer on its own thread, for live capture)
and :mod:`.reader`.
"""

from agent.sinks.record.background import BackgroundWriter
from agent.sinks.record.codec import COMPRESSIONS, check_compression, decoded
from agent.sinks.record.files import RecordFiles, RecordPolicy, Rotation, parse_rotation
from agent.sinks.record.format import FORMATS, MAGIC, VERSION, RecordError, chunk_json
from agent.sinks.record.ledger import FILE_REASONS, FlowLedger
from agent.sinks.record.reader import NativeReader, RecordedChunk
from agent.sinks.record.writers import (
    FileWriter,
    JsonLinesWriter,
    NativeWriter,
    RecordWriter,
    make_writer,
)

__all__ = [
    "COMPRESSIONS",
    "FILE_REASONS",
    "FORMATS",
    "MAGIC",
    "VERSION",
    "BackgroundWriter",
    "FileWriter",
    "FlowLedger",
    "JsonLinesWriter",
    "NativeReader",
    "NativeWriter",
    "RecordError",
    "RecordFiles",
    "RecordPolicy",
    "RecordWriter",
    "RecordedChunk",
    "Rotation",
    "check_compression",
    "chunk_json",
    "decoded",
    "make_writer",
    "parse_rotation",
]
