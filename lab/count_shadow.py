"""A shadow that only counts: accepts connections, reads everything, answers nothing.

usage: count_shadow.py HOST PORT COUNT_FILE — COUNT_FILE gets the number of request lines
(``GET ``/``POST ``... at the start of a line) seen so far, rewritten every 0.2 s and on
SIGTERM. Cheap enough that a benchmark measures the agent, not a second web server. Only
request lines at line starts count: a request right after a body without a final newline
is missed, so use it for body-less requests (wrk's GETs).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path

_REQUEST_LINE = re.compile(rb"(?:^|\n)(?:GET|POST|PUT|DELETE|HEAD|PATCH|OPTIONS) ")


class _Counter(asyncio.Protocol):
    total = 0

    def __init__(self) -> None:
        self.tail = b"\n"  # the start of the stream counts as a line start

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data
        _Counter.total += len(_REQUEST_LINE.findall(buf))
        # Keep enough to see a request line split across reads, but not one counted already.
        cut = buf.rfind(b"\n")
        frag = buf[cut:] if cut >= 0 else b""
        self.tail = frag if len(frag) < 9 and not _REQUEST_LINE.match(frag) else b""


async def _main(host: str, port: int, out: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(_Counter, host, port, backlog=4096)
    async with server:
        while not stop.is_set():
            out.write_text(f"{_Counter.total}\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    out.write_text(f"{_Counter.total}\n")


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
