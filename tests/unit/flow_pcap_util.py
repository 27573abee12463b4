"""Helpers for the per-flow pcap tests: a list source, a pcap reader, tshark's follow."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.model import ACK, PSH, Segment
from tests.unit.segments import Conversation

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


class ListSource:
    """Yields the given batches; ``after()`` runs once each batch has been processed."""

    def __init__(self, batches: list[list[Segment]],
                 after: Callable[[], None] | None = None) -> None:
        self._batches = batches
        self._after = after

    def batches(self) -> Iterator[list[Segment]]:
        for batch in self._batches:
            yield batch
            if self._after is not None:
                self._after()

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


def read_pcap(path: Path) -> tuple[int, int, list[tuple[int, int, bytes]]]:
    """(snaplen, linktype, [(caplen, original length, data)]) of a pcap (gzip or not)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, _, _, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert magic == 0xA1B2C3D4
    pos, out = 24, []
    while pos < len(raw):
        _, _, cap, orig = struct.unpack_from("<IIII", raw, pos)
        out.append((cap, orig, raw[pos + 16 : pos + 16 + cap]))
        pos += 16 + cap
    assert pos == len(raw), "a record is cut short"
    return snaplen, linktype, out


def follow(path: Path, spec: str = "0") -> tuple[bytes, bytes]:
    """tshark's ``follow,tcp,raw``: (bytes node 0 sent, bytes node 1 sent)."""
    out = subprocess.run(["tshark", "-r", str(path), "-q", "-z", f"follow,tcp,raw,{spec}"],
                         capture_output=True, text=True, check=True).stdout
    sides: tuple[list[bytes], list[bytes]] = ([], [])
    started = False
    for line in out.splitlines():
        if line.startswith("Node 1:"):
            started = True
        elif started and line.strip() and not line.startswith("="):
            sides[line.startswith("\t")].append(bytes.fromhex(line.strip()))
    return b"".join(sides[0]), b"".join(sides[1])


def conversation(port: int, request: bytes, response: bytes, pieces: int = 4,
                 client_ip: bytes = bytes([192, 0, 2, 1]),
                 server_ip: bytes = bytes([192, 0, 2, 2]),
                 ts: float = 1_700_000_000.0) -> list[Segment]:
    """A whole connection from ``client_ip:port`` to ``server_ip:8080``: handshake, the
    request and the response in ``pieces`` segments each, the client's FIN, the server's."""
    c = Conversation(client=(client_ip, port), server=(server_ip, 8080), ts=ts)
    segs = c.handshake()
    for data, from_client in ((request, True), (response, False)):
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            segs.append(c.seg(from_client, i, data[i : i + step], ACK | PSH))
    return segs + c.fins(len(request), len(response))
