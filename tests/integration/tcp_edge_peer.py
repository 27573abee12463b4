"""Run inside a test's namespace: real TCP connections on 127.0.0.1 exercising resets and data
on a SYN, with the bytes each server socket really received as ground truth.

Servers: port 8080 takes TCP Fast Open (TCP_FASTOPEN on the listener), port 8081 does not.
The namespace's ``net.ipv4.tcp_fastopen`` must let the client send data on a SYN without a
cookie and the server take it without one (0x207). Scenarios, one connection each:

- ``tfo_taken``: data on the SYN to 8080 (acknowledged by the SYN-ACK), then more.
- ``tfo_refused``: the same to 8081: the SYN-ACK acknowledges the SYN only, the client
  kernel sends the data again after the handshake.
- ``blind_rst``: to 8081, "part1"; then a RST each way 1000 bytes ahead of the receiver's
  next expected byte (in window: a challenge ACK, ignored); then "part2". Both go through.
- ``rst_data``: to 8081, "part1"; then a RST toward the server exactly at its next expected
  byte, carrying "EVIL": the server's socket is reset and never reads "EVIL".

Prints one JSON object: scenario -> {"port": client port, "received": hex of what the server
read, "reset": whether its socket was reset, "answer": hex of what the client read}.

usage: python tcp_edge_peer.py
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.model import RST
from agent.sources.filter import synthesize_frame

HOST = "127.0.0.1"
LOOPBACK = socket.inet_aton(HOST)
TCP_FASTOPEN_CONNECT = 30
ETH_P_ALL = 0x0003

received: dict[int, dict[str, object]] = {}
lock = threading.Lock()


def serve(port: int, fast_open: bool) -> socket.socket:
    """A listener answering each read with "ok" and recording what its socket received."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fast_open:
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    lst.bind((HOST, port))
    lst.listen(16)

    def conn(s: socket.socket, peer_port: int) -> None:
        got, reset = b"", False
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
                s.sendall(b"ok")
        except ConnectionResetError:
            reset = True
        with lock:
            received[peer_port] = {"received": got.hex(), "reset": reset}
        s.close()

    def accept() -> None:
        while True:
            try:
                s, addr = lst.accept()
            except OSError:
                return
            threading.Thread(target=conn, args=(s, addr[1]), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lst


class Sniffer:
    """The initial sequence numbers of connections on lo (an AF_PACKET socket)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(5)

    def isn(self, src_port: int, dst_port: int) -> int:
        """The ISN of the SYN sent from ``src_port`` to ``dst_port``."""
        while True:
            frame = self.sock.recv(65536)
            ip = frame[14:]
            if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            sport, dport, seq = struct.unpack("!HHI", tcp[:8])
            if (sport, dport) == (src_port, dst_port) and tcp[13] & 0x02:
                return int(seq)


def inject(src_port: int, dst_port: int, seq: int, payload: bytes = b"") -> None:
    """A RST from 127.0.0.1:src_port to 127.0.0.1:dst_port at ``seq`` (no ACK set)."""
    frame = synthesize_frame(LOOPBACK, LOOPBACK, src_port, dst_port, payload, seq=seq,
                             flags=RST, window=0)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.sendto(frame[14:], (HOST, 0))
    raw.close()


def fast_open(port: int, first: bytes, rest: bytes) -> tuple[int, bytes]:
    """Data on the SYN (TCP_FASTOPEN_CONNECT), then more; the client's port and answer."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    s.connect((HOST, port))
    s.sendall(first)  # goes on the SYN
    answer = s.recv(100)
    s.sendall(rest)
    answer += s.recv(100)
    return finish(s, answer)


def finish(s: socket.socket, answer: bytes) -> tuple[int, bytes]:
    port = s.getsockname()[1]
    s.settimeout(5)
    try:
        s.shutdown(socket.SHUT_WR)
        while data := s.recv(100):
            answer += data
    except OSError:  # reset (rst_data): nothing more to read
        pass
    s.close()
    return port, answer


def with_rsts(sniffer: Sniffer, exact_with_data: bool) -> tuple[int, bytes]:
    """"part1", the RST(s), then "part2" (whose sending fails quietly after a real reset)."""
    s = socket.socket()
    s.connect((HOST, 8081))
    port = s.getsockname()[1]
    c_isn, s_isn = sniffer.isn(port, 8081), sniffer.isn(8081, port)
    s.sendall(b"part1")
    answer = s.recv(100)
    c_next, s_next = c_isn + 1 + 5, s_isn + 1 + len(answer)
    if exact_with_data:
        inject(port, 8081, c_next, b"EVIL")
    else:
        inject(port, 8081, c_next + 1000)
        inject(8081, port, s_next + 1000)
    time.sleep(0.2)
    try:
        s.sendall(b"part2")
        s.settimeout(2)
        answer += s.recv(100)
    except OSError:
        pass
    return finish(s, answer)


def main() -> None:
    listeners = [serve(8080, True), serve(8081, False)]
    sniffer = Sniffer()
    runs: dict[str, Callable[[], tuple[int, bytes]]] = {
        "tfo_taken": lambda: fast_open(8080, b"hello-on-syn", b" and after"),
        "tfo_refused": lambda: fast_open(8081, b"refused-on-syn", b" then more"),
        "blind_rst": lambda: with_rsts(sniffer, False),
        "rst_data": lambda: with_rsts(sniffer, True),
    }
    result: dict[str, dict[str, object]] = {}
    for name, run in runs.items():
        port, answer = run()
        result[name] = {"port": port, "answer": answer.hex()}
    deadline = time.monotonic() + 10
    while len(received) < len(runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for item in result.values():
        item.update(received.get(int(str(item["port"])), {}))
    for lst in listeners:
        lst.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
