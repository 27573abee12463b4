"""Where recorded traffic comes from: native and JSON-lines recordings, pcap/pcapng captures.

Each source is a :class:`SourceReader`: it yields :class:`~agent.sinks.record.RecordedChunk`
records in recorded order (chunks of both directions, and flow ends where the format has
them) and, afterwards, says what was wrong with its input (:meth:`SourceReader.problems`:
one phrase each, naming the file and the position). A damaged file is read up to the damage
and past it where the format allows (a native record with a bad CRC followed by a whole one, a
JSON line that does not parse); the rest of the input replays. A NATS recording
(``nats://HOST:PORT/SUBJECT``, or ``tls://...`` for TLS; :class:`NatsSource`) is one more
reader yielding the same records: its stream is read from the start until caught up, when it
is opened.

:func:`open_sources` checks every path before anything replays (exit 2 through
:class:`SourceError`): it must be readable and be one of the formats, told by its first bytes
(a recording may be compressed, gzip or zstd, whatever its name). ``-`` is standard input; it,
a pipe, a FIFO or process substitution (``<(...)``) is read once: it stays open from the check
on, the bytes read to tell its format kept. A regular file is closed after the check and
opened again when its turn comes.
A NATS server that cannot be reached is no bad input but a failure:
:class:`~agent.sinks.nats.consumer.NatsUnavailable` goes up (exit 1, with the cause).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.model import Direction
from agent.replay.inputs import Opened, SourceError, open_input, reopen
from agent.sinks.nats.url import NatsTarget, is_nats_url, parse_nats_url
from agent.sinks.record import NativeReader, RecordedChunk, RecordError
from agent.sources import SourceError as CaptureSourceError
from agent.sources.files.capstream import STDIN, Capture, display

if TYPE_CHECKING:
    from agent.sources.files.pcapfile import PcapFileSource

__all__ = ["JsonLinesSource", "NativeSource", "NatsSource", "PcapSource", "SourceError",
           "SourceReader", "open_sources"]

_DIRECTIONS = {d.value: d for d in Direction}


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
    """A native recording (:class:`~agent.sinks.record.NativeReader`), maybe compressed.
    ``opened``: the input already open (a stream, read once); else ``path`` is opened when
    the records are read."""

    def __init__(self, path: Path, opened: Opened | None = None) -> None:
        self.name = display(path)
        self._path = path
        self._opened = opened
        self._problems: list[str] = []

    def records(self) -> Iterator[RecordedChunk]:
        opened = reopen(self._path, self._opened, "native", self._problems)
        self._opened = None
        if opened is None:
            return
        with opened:
            try:
                reader = NativeReader(opened.stream)
            except RecordError as e:
                self._problems.append(f"{self.name}: {e}")
                return
            yield from reader
            self._problems += [f"{self.name}: {p}" for p in reader.problems()]
            self._problems += opened.problems()

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


_URL_SCHEMES = ("nats", "tls")


def nats_url(path: Path | str) -> str | None:
    """The ``nats://`` or ``tls://`` URL a command-line source names, or None for a file: a
    path keeps one slash of the two (``nats:/host:4222/subject``, ``tls:/host...``), so both
    spellings are taken for either scheme."""
    text = str(path)
    if is_nats_url(text):
        return text
    for scheme in _URL_SCHEMES:
        if text[:len(scheme) + 2].lower() == f"{scheme}:/":
            return f"{scheme}://{text[len(scheme) + 2:]}"
    return None


class JsonLinesSource:
    """A JSON-lines recording, maybe compressed: one chunk object per line (``flow``,
    ``from``, ``to``, ``direction``, ``seen_at``, ``data`` in base64, ``gap_bytes``). A line
    that is not such an object is skipped and reported with its number and byte offset.
    ``opened``: as for :class:`NativeSource`."""

    def __init__(self, path: Path, opened: Opened | None = None) -> None:
        self.name = display(path)
        self._path = path
        self._opened = opened
        self._bad: list[tuple[int, int, str]] = []
        self._bad_count = 0
        self._other: list[str] = []  # problems of the input as a whole

    def records(self) -> Iterator[RecordedChunk]:
        offset = 0
        opened = reopen(self._path, self._opened, "jsonl", self._other)
        self._opened = None
        if opened is None:
            return
        with opened:
            for number, line in enumerate(opened.stream, 1):
                if line.strip():
                    try:
                        yield _json_chunk(line)
                    except (ValueError, KeyError, TypeError, binascii.Error) as e:
                        cut = "" if line.endswith(b"\n") else " (truncated last line)"
                        self._note(number, offset, f"{type(e).__name__}: {e}"[:120] + cut)
                offset += len(line)
            self._other += opened.problems()

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
        return out + self._other


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
    the service's: they tell requests from responses.

    The pipeline runs on a thread of its own and writes a native recording of both
    directions, flow ends included, into a pipe, which :meth:`records` reads as it goes:
    nothing is held but what is in the pipe. Each pass reads the files again."""

    def __init__(self, paths: Sequence[Path | Capture], ports: Sequence[int]) -> None:
        self.name = ", ".join(display(p) if isinstance(p, Path) else p.name for p in paths)
        self._paths = list(paths)
        self._ports = list(ports)
        self._source: PcapFileSource | None = self._open()
        self._problems: list[str] = []

    def _open(self) -> PcapFileSource:
        from agent.sources.files.pcapfile import PcapFileSource

        try:
            return PcapFileSource(list(self._paths))
        except CaptureSourceError as e:
            raise SourceError(str(e)) from None

    def records(self) -> Iterator[RecordedChunk]:
        source, self._source = self._source, None
        if source is None:
            try:
                source = self._open()
            except SourceError as e:
                self._problems.append(f"{e} (since it was checked)")
                return
        errors: list[BaseException] = []
        rfd, wfd = os.pipe()
        thread = threading.Thread(target=_pipeline, args=(source, wfd, self._ports, errors),
                                  name="replay-pcap", daemon=True)
        thread.start()
        with os.fdopen(rfd, "rb") as pipe:
            yield from NativeReader(pipe)
        thread.join()
        if errors:
            raise errors[0]
        stats = source.stats()
        if stats.get("cut_short_files"):
            self._problems.append(f"{stats['cut_short_files']} capture file(s) cut short "
                                  "(the warning above names the file, frame and offset)")
        if stats.get("bad_frames"):
            self._problems.append(f"{stats['bad_frames']} damaged frame(s) skipped")

    def problems(self) -> list[str]:
        return list(self._problems)


def _pipeline(source: PcapFileSource, wfd: int, ports: list[int],
              errors: list[BaseException]) -> None:
    """The offline pipeline over ``source``, recording everything (both directions) to the
    pipe ``wfd``, which it closes at the end; what it raised goes to ``errors``."""
    from agent.hooks import KeepAll
    from agent.mirror.config import MirrorConfig
    from agent.mirror.driver import TrafficMirror

    try:
        with os.fdopen(wfd, "wb") as pipe:
            config = MirrorConfig(observed_port=ports[0], extra_ports=frozenset(ports),
                                  writer=pipe, record_hook=KeepAll())
            TrafficMirror(config).run(source)
    except BaseException as e:
        errors.append(e)


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
    if sum(1 for p in paths if p == STDIN) > 1:
        raise SourceError("standard input (-) is given more than once")
    out: list[SourceReader] = []
    captures: list[Path | Capture] = []
    for path in rotation_order(paths):
        url = nats_url(path)
        if url is not None:
            if captures:
                out.append(_pcap(captures, ports))
                captures = []
            out.append(_nats(url))
            continue
        kind, opened = _checked(path)
        if kind == "pcap":
            captures.append(opened.capture if opened and opened.capture else path)
            continue
        if captures:
            out.append(_pcap(captures, ports))
            captures = []
        out.append(NativeSource(path, opened) if kind == "native"
                   else JsonLinesSource(path, opened))
    if captures:
        out.append(_pcap(captures, ports))
    return out


def _checked(path: Path) -> tuple[str, Opened | None]:
    """The kind of ``path``; and, for a stream (read once), the input open, its first bytes
    kept. A regular file is closed again (one file is open at a time: it is opened again
    when its turn comes)."""
    opened = open_input(path)
    if not opened.regular or path == STDIN:  # a duplicate of stdin shares its offset
        return opened.kind, opened
    opened.close()
    return opened.kind, None


def _nats(url: str) -> NatsSource:
    try:
        target = parse_nats_url(url)
    except ValueError as e:
        raise SourceError(str(e)) from None
    return NatsSource(target)


def _pcap(paths: list[Path | Capture], ports: Sequence[int]) -> PcapSource:
    if not ports:
        first = paths[0]
        name = display(first) if isinstance(first, Path) else first.name
        raise SourceError(f"{name} is a capture: give the service's --port, which tells "
                          "requests from responses")
    return PcapSource(paths, ports)
