"""The eBPF source alone, as a process, for tests of what it captures where (no pipeline).

usage: python -m agent.lab.capture_runner SPEC PORTS OUT [TC_MODE [ENGINE]]

Captures PORTS (comma-separated) on the interfaces SPEC names (``--iface`` syntax), logs
"capture live" on stderr once attached, and writes to OUT one JSON line per segment with
payload: ``{"src": "ip:port", "dst": "ip:port", "data": latin-1 text}``. OUT.status holds
the attached interfaces and what the follower tracks, rewritten whenever it changes. On
SIGTERM it drains, writes its stats to OUT.stats, closes the source and exits 0.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO

from agent.capture.ebpf import EbpfSource
from agent.model import Segment


def _addr(ip: bytes, port: int) -> str:
    return f"{ipaddress.ip_address(ip)}:{port}"


def _write(out: IO[str], segs: list[Segment]) -> None:
    for s in segs:
        if s.payload:
            out.write(json.dumps({"src": _addr(s.src_ip, s.src_port),
                                  "dst": _addr(s.dst_ip, s.dst_port),
                                  "data": bytes(s.payload).decode("latin-1")}) + "\n")
    out.flush()


def _status(src: EbpfSource) -> dict[str, object]:
    return {"ifaces": [i.as_dict() for i in src.interfaces()], "tracked": src.tracked()}


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    spec, ports, out_path = argv[0], [int(p) for p in argv[1].split(",")], Path(argv[2])
    tc_mode = argv[3] if len(argv) > 3 else "auto"
    engine = argv[4] if len(argv) > 4 else "tc"
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    src = EbpfSource(spec, ports, engine, buffer_mib=4, tc_mode=tc_mode, decoder="python",
                     own_ports=(61000, 65535))
    status_path = out_path.with_name(out_path.name + ".status")
    last = json.dumps(_status(src))
    _replace(status_path, last)
    print("capture live", file=sys.stderr, flush=True)
    with out_path.open("w") as out:
        try:
            for batch in src.batches():
                _write(out, batch)
                now = json.dumps(_status(src))
                if now != last:
                    _replace(status_path, now)
                    last = now
                if stop:
                    break
            _write(out, src.drain())
            _replace(status_path, json.dumps(_status(src)))
            _replace(out_path.with_name(out_path.name + ".stats"), json.dumps(src.stats()))
        finally:
            src.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
