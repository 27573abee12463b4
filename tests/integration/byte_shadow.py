"""A shadow that keeps every connection's bytes: accepts, reads to the end, answers nothing.

usage: byte_shadow.py HOST PORT DIR — each connection's bytes go to DIR/<n>.bin once it
closes (written to a temporary name first, so a file that exists is whole). Stops on
SIGTERM.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from pathlib import Path

_ids = itertools.count()


async def _serve(host: str, port: int, out: Path) -> None:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        n = next(_ids)
        tmp = out / f".{n}.tmp"
        tmp.write_bytes(data)
        tmp.rename(out / f"{n}.bin")
        writer.close()

    server = await asyncio.start_server(one, host, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def received(out: Path) -> list[bytes]:
    """What the shadow got so far, one item per closed connection, sorted."""
    return sorted(p.read_bytes() for p in out.glob("*.bin"))


if __name__ == "__main__":
    folder = Path(sys.argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), folder))
