"""Builders for hand-made TCP conversations (test helper, no I/O)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from agent.model import ACK, FIN, PSH, SYN, Segment

CLIENT = (bytes([192, 0, 2, 1]), 40000)
SERVER = (bytes([192, 0, 2, 2]), 8080)


@dataclass
class Conversation:
    """A client and a server; ``seg`` makes segments with the right addresses and numbers."""

    client_isn: int = 1000
    server_isn: int = 5000
    client: tuple[bytes, int] = CLIENT
    server: tuple[bytes, int] = SERVER
    ts: float = 1_700_000_000.0
    log: list[Segment] = field(default_factory=list)

    def seg(
        self, from_client: bool, offset: int, payload: bytes = b"", flags: int = ACK | PSH,
        window: int = 65535, lost: int = 0, ts: float | None = None, ack: int = 0,
    ) -> Segment:
        """A segment whose payload starts ``offset`` bytes into its direction's stream;
        ``ack``: its raw acknowledgment number."""
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        isn = self.client_isn if from_client else self.server_isn
        seq = (isn + 1 + offset) & 0xFFFFFFFF
        if flags & SYN:
            seq = isn & 0xFFFFFFFF
        self.ts += 0.001
        return Segment(src[0], src[1], dst[0], dst[1], seq, ack, flags, payload,
                       self.ts if ts is None else ts, window, lost)

    def handshake(self) -> list[Segment]:
        return [
            self.seg(True, 0, flags=SYN),
            self.seg(False, 0, flags=SYN | ACK),
            self.seg(True, 0, flags=ACK),
        ]

    def fins(self, client_len: int, server_len: int) -> list[Segment]:
        return [
            self.seg(True, client_len, flags=FIN | ACK),
            self.seg(False, server_len, flags=FIN | ACK),
        ]


def split(data: bytes, rng: random.Random, max_size: int = 300) -> list[tuple[int, bytes]]:
    """Cut ``data`` into random consecutive (offset, piece) parts."""
    out = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_size)
        out.append((pos, data[pos : pos + n]))
        pos += n
    return out
