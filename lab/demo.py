"""``make demo``: live mirroring of a real HTTP service, end to end, in private namespaces.

It creates two network namespaces joined by a veth pair: a *client* namespace and a
*service* namespace holding an HTTP service (10.77.0.1:8080) and a shadow (127.0.0.1:18080).
``mirror-agent run`` attaches its eBPF program with TC to the service's veth and forwards
every connection's client→service bytes to the shadow. The client side drives keep-alive
clients, parallel clients, a 4 MB upload and one lone request; then the agent is stopped with
SIGTERM, and the demo prints how many requests the service and the shadow got and whether
they are byte-identical (each server logs a hash of every request's line, headers and body).
Everything is deleted afterwards.

``--offline`` instead replays the bundled capture (``agent/data/demo.pcap``: 61 requests over
7 keep-alive connections) through the same pipeline into an in-process shadow; it needs no
privileges.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import agent
from agent.cli.logsetup import configure_logging
from agent.cli.summary import format_summary
from agent.hooks import OnlyToObserved
from agent.hooks.http import InjectHeader, RedactHeaders
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.sinks.record import NativeReader
from agent.sources.files.pcapfile import PcapFileSource

CAPTURE = Path(agent.__file__).parent / "data" / "demo.pcap"  # shipped: the offline example


def _requests(log: Path) -> Counter[str]:
    """One entry per logged request: method, path, body length, digest (not the X- headers)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(" ".join(line.split(" ")[:4]) for line in lines)


def live_demo() -> int:
    """The namespace demo described above; returns the exit status (0: byte-exact)."""
    from lab.netns import LiveAgent, NetNS, run_clients, sh, start_python_server

    with tempfile.TemporaryDirectory(prefix="mirror-demo-") as tmp:
        work = Path(tmp)
        service_log, shadow_log = work / "service.log", work / "shadow.log"
        upload = work / "upload.bin"
        upload.write_bytes(os.urandom(4 << 20))
        with NetNS("mirdemo") as svc, NetNS("mirdemo") as cli:
            print(f"namespaces {svc.name} (service) and {cli.name} (client), joined by a veth")
            svc.veth_to(cli, "10.77.0.1/24", "10.77.0.2/24")
            start_python_server(svc, 8080, host="10.77.0.1", log=service_log)
            start_python_server(svc, 18080, log=shadow_log)
            print("service on 10.77.0.1:8080, shadow on 127.0.0.1:18080 (service namespace)")
            agent = LiveAgent(svc, work, "--iface", svc.veth, "--port", "8080", "--engine",
                              "tc", "--target", "127.0.0.1:18080", "--record",
                              str(work / "rec.bin"))
            print(f"mirror-agent run --iface {svc.veth} --port 8080 --engine tc "
                  "--target 127.0.0.1:18080: capture live")
            started = time.monotonic()
            sent = run_clients(cli, "10.77.0.1", 8080, 4, 50, 4000)
            print(f"  keep-alive: 4 connections x 50 requests (bodies up to 4 KB): {sent} done")
            par = run_clients(cli, "10.77.0.1", 8080, 40, 5)
            print(f"  parallel:   40 connections x 5 requests: {par} done")
            cli.run("curl", "-sf", "-o", "/dev/null", "-H", "Expect:", "--data-binary",
                    f"@{upload}", "http://10.77.0.1:8080/upload")
            print("  upload:     one 4 MB POST: done")
            cli.run("curl", "-sf", "-o", "/dev/null", "http://10.77.0.1:8080/lone")
            print(f"  lone:       one GET: done ({time.monotonic() - started:.1f} s in all)")
            summary = agent.stop()
            print("stopped the agent with SIGTERM")
            leftover = svc.run("tc", "qdisc", "show", "dev", svc.veth).stdout
        names = sh("ip", "netns", "list").stdout
        service, shadow = _requests(service_log), _requests(shadow_log)

    print(summary[summary.index("mirror-agent summary"):], end="")
    exact = service == shadow
    print(f"\nrequests the service got:  {sum(service.values())}")
    print(f"requests the shadow got:   {sum(shadow.values())}")
    print("byte-exact:                " + ("yes, every request line, header and body" if exact
          else f"NO: {sum((service - shadow).values())} missing or different"))
    clean = "clsact" not in leftover and svc.name not in names and cli.name not in names
    print("cleaned up:                " + ("namespaces deleted, nothing left attached" if clean
          else "NO, something was left behind"))
    return 0 if exact and clean and sum(service.values()) == 1 + 200 + 200 + 1 else 1


class _Shadow(BaseHTTPRequestHandler):
    """The offline demo's in-process shadow: remembers each request it gets."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, int, str]] = []
    lock = threading.Lock()

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            self.seen.append((self.command, self.path, len(body),
                              self.headers.get("X-Mirror", "")))
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


def offline_demo() -> int:
    """Replay the bundled capture into an in-process shadow; returns the exit status."""
    configure_logging("warning")
    shadow = ThreadingHTTPServer(("127.0.0.1", 0), _Shadow)
    shadow.daemon_threads = True
    threading.Thread(target=shadow.serve_forever, daemon=True).start()
    port = shadow.server_address[1]
    recording = io.BytesIO()
    mirror = TrafficMirror(MirrorConfig(
        observed_port=8080,
        target_addr=f"127.0.0.1:{port}",
        writer=recording,
        forward_hook=[OnlyToObserved(), InjectHeader("X-Mirror", "1")],
        record_hook=[OnlyToObserved(), RedactHeaders()],
    ))
    print(f"replaying {CAPTURE.name} (service port 8080) into a shadow at 127.0.0.1:{port} ...")
    mirror.run(PcapFileSource([CAPTURE]))
    shadow.shutdown()
    recording.seek(0)
    records = [r for r in NativeReader(recording) if r.kind == "chunk"]
    requests_in_capture = sum(r.data.count(b" HTTP/1.1\r\n") for r in records)
    stats = mirror.stats()
    print(format_summary(stats), end="")
    tagged = sum(1 for s in _Shadow.seen if s[3] == "1")
    print(f"\nconnections in the capture:  {stats['mirror_agent_reassembly_flows_opened_total']}")
    print(f"requests in the capture:     {requests_in_capture}")
    print(f"requests the shadow got:     {len(_Shadow.seen)} ({tagged} with X-Mirror: 1)")
    redacted = [r for r in records if b"[REDACTED]" in r.data]
    if redacted:
        line = next(x for x in redacted[0].data.split(b"\r\n") if b"[REDACTED]" in x)
        print(f"recorded with credentials redacted, e.g.: {line.decode()}")
    ok = len(_Shadow.seen) == requests_in_capture == tagged
    print("result: " + ("every request mirrored" if ok else "MISMATCH"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offline", action="store_true",
                        help="replay the bundled capture instead (no root needed)")
    args = parser.parse_args(argv)
    if args.offline:
        return offline_demo()
    if os.geteuid() != 0:
        sys.stderr.write("the live demo needs root (namespaces, eBPF); "
                         "'python -m lab.demo --offline' needs none\n")
        return 2
    return live_demo()


if __name__ == "__main__":
    sys.exit(main())
