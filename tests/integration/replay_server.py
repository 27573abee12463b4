"""A raw HTTP/1.1 server for replay tests: keeps each connection's bytes exactly as received
(written to DIR/conn-N.bin when the connection ends) and answers each request like the lab's
nginx (200, ``hello from nginx``), except ``--fail-path`` (500). ``--noisy`` answers JSON
with a timestamp and a random X-Request-Id, as a real service's build of today would.

usage: replay_server.py HOST PORT DIR [--fail-path PATH] [--noisy]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.replay.http import frame_requests

_ids = itertools.count()


def answer(path: str, fail: str | None, noisy: bool) -> bytes:
    status = b"500 Internal Server Error" if path == fail else b"200 OK"
    body = b"hello from nginx\n"
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
    if noisy:
        body = json.dumps({"ts": time.time(), "path": path}).encode()
        head += f"X-Request-Id: {uuid.uuid4()}\r\n".encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--fail-path")
    ap.add_argument("--noisy", action="store_true")
    args = ap.parse_args()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = bytearray()
        done = 0
        try:
            while data := await r.read(65536):
                buf += data
                reqs, _ = frame_requests(bytes(buf))
                for req in reqs[done:]:
                    w.write(answer(req.path, args.fail_path, args.noisy))
                done = len(reqs)
        except ConnectionError:
            pass
        finally:
            (args.dir / f"conn-{next(_ids)}.bin").write_bytes(bytes(buf))
            w.close()

    srv = await asyncio.start_server(handle, args.host, args.port)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
