"""Where recorded traffic comes from: native and JSON-lines recordings, pcap/pcapng captures.

Each source is a :class:`SourceReader`: it yields :class:`~agent.sinks.record.RecordedChunk`
records in recorded order (chunks of both directions, and flow ends where the format has
them) and, afterwards, says what was wrong with its input (:meth:`SourceReader.problems`:
one phrase each, naming the file and the position). A damaged file is read up to the damage
and past it where the format allows (a native record with a bad CRC followed by a whole one, a
JSON line that does not parse); the rest of the input replays. A NATS recording
(``nats://HOST:PORT/SUBJECT``, :class:`NatsSource`) is one more reader yielding the same
records: its stream is read from the start until caught up, when it is opened.

:func:`open_sources` checks every path before anything replays (exit 2 through
:class:`SourceError`): it must be readable and be one of the formats, told by its first bytes.
A NATS server that cannot be reached is no bad input but a failure:
:class:`~agent.sinks.nats.consumer.NatsUnavailable` goes up (exit 1, with the cause).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from agent.capture import SourceError as CaptureSourceError
from agent.model import Direction, TrafficChunk
from agent.sinks.nats.url import NatsTarget, is_nats_url, parse_nats_url
from agent.sinks.record import MAGIC, NativeReader, RecordedChunk, RecordError

__all__ = ["JsonLinesSource", "NativeSource", "NatsSource", "PcapSource", "SourceError",
           "SourceReader", "open_sources"]

_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
                b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a")
_DIRECTIONS = {d.value: d for d in Direction}


class SourceError(Exception):
    """A source cannot be replayed at all (missing, unreadable, no known format): exit 2."""


class SourceReader(Protocol):
    """Recorded traffic, in recorded order. ``name`` is what messages call it."""

    name: str

    def records(self) -> Iterator[RecordedChunk]:
        """Every record, once; a damaged input is read as far as possible."""
        ...

    def problems(self) -> list[str]:
        """What was wrong with the input (after :meth:`records`): one line each, with the
        position; empty if nothing."""
        ...


class NativeSource:
    """A native recording (:class:`~agent.sinks.record.NativeReader`)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._path = path
        self._problems: list[str] = []

    def records(self) -> Iterator[RecordedChunk]:
        with self._path.open("rb") as f:
            try:
                reader = NativeReader(f)
            except RecordError as e:
                self._problems.append(f"{self.name}: {e}")
                return
            yield from reader
            self._problems += [f"{self.name}: {p}" for p in reader.problems()]

    def problems(self) -> list[str]:
        return list(self._problems)


class NatsSource:
    """A NATS recording: every message of the subject, from the stream's start until caught
    up, read when the source is made (:func:`agent.sinks.nats.consumer.read_stream`).
    :class:`SourceError` if no stream holds the subject;
    :class:`~agent.sinks.nats.consumer.NatsUnavailable` if the server cannot be reached."""

    def __init__(self, target: NatsTarget) -> None:
        from agent.sinks.nats.consumer import NoStream, read_stream

        self.name = target.url
        try:
            self._read = read_stream(target)
        except NoStream as e:
            raise SourceError(str(e)) from None

    def records(self) -> Iterator[RecordedChunk]:
        yield from self._read.records

    def problems(self) -> list[str]:
        return [f"{self.name}: {p}" for p in self._read.problems]


def nats_url(path: Path) -> str | None:
    """The ``nats://`` URL a command-line source names, or None for a file: a path keeps
    one slash of the two (``nats:/host:4222/subject``), so both spellings are taken."""
    text = str(path)
    if is_nats_url(text):
        return text
    if text[:6].lower() == "nats:/":
        return "nats://" + text[6:]
    return None


class JsonLinesSource:
    """A JSON-lines recording: one chunk object per line (``flow``, ``from``, ``to``,
    ``direction``, ``seen_at``, ``data`` in base64, ``gap_bytes``). A line that is not such an
    object is skipped and reported with its number and byte offset."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._path = path
        self._bad: list[tuple[int, int, str]] = []
        self._bad_count = 0

    def records(self) -> Iterator[RecordedChunk]:
        offset = 0
        with self._path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield _json_chunk(line)
                    except (ValueError, KeyError, TypeError, binascii.Error) as e:
                        cut = "" if line.endswith(b"\n") else " (truncated last line)"
                        self._note(number, offset, f"{type(e).__name__}: {e}"[:120] + cut)
                offset += len(line)

    def _note(self, number: int, offset: int, why: str) -> None:
        self._bad_count += 1
        if len(self._bad) < 10:
            self._bad.append((number, offset, why))

    def problems(self) -> list[str]:
        out = [f"{self.name}: line {n} (byte offset {off}) skipped: {why}"
               for n, off, why in self._bad]
        if self._bad_count > len(self._bad):
            out.append(f"{self.name}: {self._bad_count - len(self._bad)} more bad line(s) "
                       "skipped")
        return out


def _json_chunk(line: bytes) -> RecordedChunk:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    flow, seen, gap = obj["flow"], obj["seen_at"], obj.get("gap_bytes", 0)
    if not (isinstance(flow, int) and isinstance(seen, int | float) and isinstance(gap, int)):
        raise TypeError("flow, seen_at or gap_bytes is not a number")
    return RecordedChunk("chunk", flow, _DIRECTIONS[obj["direction"]], float(seen), gap,
                         str(obj["from"]), str(obj["to"]),
                         base64.b64decode(obj["data"], validate=True))


class PcapSource:
    """pcap/pcapng files, reassembled by the mirror's own offline pipeline. ``ports`` are
    the service's: they tell requests from responses."""

    def __init__(self, paths: Sequence[Path], ports: Sequence[int]) -> None:
        from agent.capture.pcapfile import PcapFileSource

        self.name = ", ".join(map(str, paths))
        self._ports = list(ports)
        try:
            self._source = PcapFileSource(list(paths))
        except CaptureSourceError as e:
            raise SourceError(str(e)) from None
        self._problems: list[str] = []

    def records(self) -> Iterator[RecordedChunk]:
        from agent.config import MirrorConfig
        from agent.hooks import KeepAll
        from agent.mirror import TrafficMirror

        got: list[RecordedChunk] = []

        def keep(chunk: TrafficChunk, data: bytes) -> None:
            got.append(RecordedChunk("chunk", chunk.flow_id, chunk.direction, chunk.seen_at,
                                     chunk.gap_bytes, chunk.from_addr, chunk.to_addr, data))

        config = MirrorConfig(observed_port=self._ports[0], extra_ports=frozenset(self._ports),
                              write_func=keep, record_hook=KeepAll())
        TrafficMirror(config).run(self._source)
        stats = self._source.stats()
        if stats.get("cut_short_files"):
            self._problems.append(f"{stats['cut_short_files']} capture file(s) cut short "
                                  "(the warning above names the file, frame and offset)")
        if stats.get("bad_frames"):
            self._problems.append(f"{stats['bad_frames']} damaged frame(s) skipped")
        yield from got

    def problems(self) -> list[str]:
        return list(self._problems)


def _kind(path: Path) -> str:
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(MAGIC) or not head:
        return "native"
    if head[:4] in _PCAP_MAGICS:
        return "pcap"
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    raise SourceError(f"{path}: not a recording (native or JSON lines) nor a pcap/pcapng "
                      "capture")


#: A rotated recording's name: STEM[.N]SUFFIX (``rec.bin``, ``rec.1.bin``, ``rec.12.bin.gz``).
_ROTATED = re.compile(r"^(.*?)(?:\.(\d+))?((?:\.[A-Za-z][A-Za-z0-9]*)*)$")


def rotation_order(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each rotated set in the order it was written (``rec.bin``,
    ``rec.1.bin``, ``rec.2.bin``, ``rec.10.bin``, as a shell glob does not give them); sets
    and other files keep the order of their first appearance."""
    groups: dict[tuple[str, str, str], list[tuple[int, Path]]] = {}
    for path in paths:
        m = _ROTATED.match(path.name)
        stem, n, suffix = (m.group(1), m.group(2), m.group(3)) if m else (path.name, None, "")
        groups.setdefault((str(path.parent), stem, suffix), []).append((int(n or 0), path))
    return [p for members in groups.values() for _, p in sorted(members, key=lambda x: x[0])]


def open_sources(paths: Sequence[Path], ports: Sequence[int]) -> list[SourceReader]:
    """A reader per recording, in the order given (each rotated set in the order it was
    written: :func:`rotation_order`); consecutive capture files are one reader (one
    reassembly). SourceError if a path cannot be read or is of no known kind, or captures
    are given without ``ports``."""
    out: list[SourceReader] = []
    captures: list[Path] = []
    for path in rotation_order(paths):
        url = nats_url(path)
        if url is not None:
            if captures:
                out.append(_pcap(captures, ports))
                captures = []
            out.append(_nats(url))
            continue
        kind = _kind(path)
        if kind == "pcap":
            captures.append(path)
            continue
        if captures:
            out.append(_pcap(captures, ports))
            captures = []
        out.append(NativeSource(path) if kind == "native" else JsonLinesSource(path))
    if captures:
        out.append(_pcap(captures, ports))
    return out


def _nats(url: str) -> NatsSource:
    try:
        target = parse_nats_url(url)
    except ValueError as e:
        raise SourceError(str(e)) from None
    return NatsSource(target)


def _pcap(paths: list[Path], ports: Sequence[int]) -> PcapSource:
    if not ports:
        raise SourceError(f"{paths[0]} is a capture: give the service's --port, which tells "
                          "requests from responses")
    return PcapSource(paths, ports)
