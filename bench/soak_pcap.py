"""Small capture files for the soak's ``POST /pcap`` jobs, synthesised byte by byte.

:func:`write_job` writes a classic pcap (Ethernet) of ``conns`` complete HTTP/1.1
connections from 192.0.2.x (TEST-NET-1) to 198.51.100.1:PORT (TEST-NET-2), so they can never
share a flow with live loopback traffic: handshake, one request ``GET /pcapjob/<tag>/<job>/<i>``
with ``Connection: close``, a 200 answer, FINs both ways. Checksums are valid.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["write_job"]

SERVER = bytes([198, 51, 100, 1])
_SYN, _FIN, _ACK, _PSH = 0x02, 0x01, 0x10, 0x08
_ETH = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def _csum(data: bytes) -> int:
    """The Internet checksum of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(src: bytes, dst: bytes, ports: tuple[int, int], seq: int, ack: int, flags: int,
           payload: bytes = b"") -> bytes:
    """One Ethernet/IPv4/TCP frame (``ports``: source, destination)."""
    tcp = struct.pack("!HHIIBBHHH", ports[0], ports[1], seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp + payload)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64,
                     6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return _ETH + ip + tcp + payload


def _connection(client: bytes, cport: int, port: int, request: bytes) -> list[bytes]:
    """The frames of one connection carrying ``request`` and a short answer."""
    c, s = 1000, 5000  # initial sequence numbers
    up, down = (cport, port), (port, cport)
    return [
        _frame(client, SERVER, up, c, 0, _SYN),
        _frame(SERVER, client, down, s, c + 1, _SYN | _ACK),
        _frame(client, SERVER, up, c + 1, s + 1, _ACK),
        _frame(client, SERVER, up, c + 1, s + 1, _PSH | _ACK, request),
        _frame(SERVER, client, down, s + 1, c + 1 + len(request), _PSH | _ACK, _ANSWER),
        _frame(SERVER, client, down, s + 1 + len(_ANSWER), c + 1 + len(request), _FIN | _ACK),
        _frame(client, SERVER, up, c + 1 + len(request), s + 2 + len(_ANSWER), _FIN | _ACK),
        _frame(SERVER, client, down, s + 2 + len(_ANSWER), c + 2 + len(request), _ACK),
    ]


def write_job(path: Path, tag: str, job: int, conns: int, port: int) -> None:
    """Write job ``job``'s capture of ``conns`` connections to service ``port``."""
    client = bytes([192, 0, 2, 1 + job % 250])
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    t = 1_700_000_000.0
    for i in range(conns):
        request = (f"GET /pcapjob/{tag}/{job}/{i} HTTP/1.1\r\nHost: soak\r\n"
                   f"User-Agent: soak-pcap\r\nConnection: close\r\n\r\n").encode()
        for frame in _connection(client, 20000 + (job * 97 + i) % 40000, port, request):
            t += 0.0005
            sec = int(t)
            out.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
            out.append(frame)
    path.write_bytes(b"".join(out))
