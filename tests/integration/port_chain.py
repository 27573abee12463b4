"""Run inside a test's namespace by tests/integration/test_port_limit.py: the control API's
``PUT /ports`` through :class:`~agent.cli.control.RunningAgent` to a real capture on ``lo``,
with the kernel made to refuse one change halfway: the eBPF program's port map fails its
FAIL_AT-th update (``tc``), or the AF_PACKET socket refuses the new filter (``afpacket``).
After every request it prints what ``GET /ports``, the mirror's classifier and the kernel
hold (the map's keys read back; for the socket, the ports whose compiled filter is the one
read back from it), one JSON object a line.

usage: python -m tests.integration.port_chain tc|afpacket FAIL_AT
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.cli.control import RunningAgent
from agent.cli.layers import parse_options
from agent.control.api import Api, Request
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.sources import MAX_PORTS, afpacket
from agent.sources.afpacket import AfPacketSource
from agent.sources.ebpf.bpfsys import BpfError, BpfMap
from agent.sources.ebpf.source import EbpfSource


class FlakyMap:
    """A map whose ``fail_at``-th update fails as the kernel would (ENOMEM)."""

    def __init__(self, real: BpfMap, fail_at: int) -> None:
        self.real = real
        self.fail_at = fail_at
        self.updates = 0

    def update(self, key: bytes, value: bytes) -> None:
        self.updates += 1
        if self.updates == self.fail_at:
            raise BpfError(errno.ENOMEM, "map update: Cannot allocate memory")
        self.real.update(key, value)

    def delete(self, key: bytes) -> bool:
        return self.real.delete(key)

    def dump_keys(self) -> list[bytes]:
        return self.real.dump_keys()


@contextmanager
def refusing(src: EbpfSource | AfPacketSource, fail_at: int) -> Iterator[None]:
    """The kernel refuses the next change halfway (eBPF) or at once (the socket filter)."""
    if isinstance(src, EbpfSource):
        maps = src._prog._loaded.maps
        real = maps["ports"]
        maps["ports"] = FlakyMap(real, fail_at)  # type: ignore[assignment]
        try:
            yield
        finally:
            maps["ports"] = real
        return

    def attach(_sock: object, _bpf: object) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    real_attach = afpacket._attach
    afpacket._attach = attach  # type: ignore[assignment]
    try:
        yield
    finally:
        afpacket._attach = real_attach


def kernel_view(src: EbpfSource | AfPacketSource) -> Callable[[list[int]], list[int] | str]:
    """What the kernel filters, as ports: the map's keys, or (a socket filter cannot be
    read as ports) ``ports`` if the filter on the socket is theirs, else "mismatch"."""
    if isinstance(src, EbpfSource):
        return lambda _shown: src.kernel_ports()

    def socket_filter(shown: list[int]) -> list[int] | str:
        return shown if src.kernel_filter() == src._compile(shown).instructions() \
            else "mismatch"
    return socket_filter


def main(engine: str, fail_at: int) -> None:
    agent = RunningAgent(parse_options(["run", "--iface", "lo", "--port", "9000"], {}))
    mirror = agent.mirror = TrafficMirror(MirrorConfig(observed_port=9000))
    src = EbpfSource("lo", [9000]) if engine == "tc" else AfPacketSource(["lo"], [9000])
    agent.source = src
    api = Api(agent)
    kernel = kernel_view(src)

    def put(step: str, ports: list[int]) -> None:
        body = json.dumps({"ports": ports}).encode()
        r = api.handle(Request("PUT", "/ports", {"content-length": str(len(body))}, body))
        got = json.loads(api.handle(Request("GET", "/ports")).body)["ports"]
        print(json.dumps({"step": step, "status": r.status, "answer": json.loads(r.body),
                          "get": got, "mirror": sorted(mirror.ports),
                          "kernel": kernel(got)}), flush=True)

    try:
        put("65 ports", list(range(9100, 9165)))
        put("too many", list(range(10000, 10001 + MAX_PORTS)))
        with refusing(src, fail_at):
            put("refused halfway", [9000, *range(9150, 9250)])
        put("after the failure", [9000, 9200])
    finally:
        src.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
