"""Reading a NATS recording back: every message of the subject, from the stream's start,
until caught up (for ``mirror-agent replay nats://HOST:PORT/SUBJECT``).

An ordered push consumer (ephemeral; nats-py recreates it on a gap, so messages come once and
in stream order) reads from the first message. "Caught up" is the message after which none
of the subject were pending when it was delivered (JetStream's ``num_pending``): a recorder
still publishing does not keep the replay from starting. A message that is not one whole
native record is skipped and reported with its stream sequence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from agent.sinks.nats.client import connect, describe
from agent.sinks.nats.message import BadMessage, decode
from agent.sinks.nats.url import NatsTarget
from agent.sinks.record.reader import RecordedChunk

__all__ = ["NatsUnavailable", "NoStream", "StreamRead", "read_stream"]

#: Bad messages named one by one; the rest are only counted.
_SHOWN = 10


class NatsUnavailable(Exception):
    """The server cannot be reached, or has no JetStream (the cause is in the message)."""


class NoStream(Exception):
    """No stream captures the subject: nothing was ever recorded there."""


@dataclass
class StreamRead:
    """What :func:`read_stream` got: the records in stream order, and what was wrong."""

    stream: str
    records: list[RecordedChunk] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    bad: int = 0

    def note(self, seq: int, why: str) -> None:
        self.bad += 1
        if self.bad <= _SHOWN:
            self.problems.append(f"message {seq} skipped: {why}")


def read_stream(target: NatsTarget, connect_timeout: float = 5.0,
                idle_timeout: float = 10.0) -> StreamRead:
    """Every record published to ``target``'s subject, from the stream's start until caught
    up. :class:`NatsUnavailable` if the server cannot be reached (within
    ``connect_timeout``), :class:`NoStream` if no stream captures the subject. If no
    message comes for ``idle_timeout`` seconds before it is caught up, it stops there and
    says so in :attr:`StreamRead.problems`."""
    return asyncio.run(_read(target, connect_timeout, idle_timeout))


async def _read(target: NatsTarget, connect_timeout: float, idle_timeout: float) -> StreamRead:
    from nats.js.errors import NotFoundError

    try:
        nc: Any = await connect(target, connect_timeout, "mirror-agent replay")
    except ConnectionError as e:
        raise NatsUnavailable(str(e)) from None
    try:
        js = nc.jetstream(timeout=connect_timeout)
        try:
            stream = await js.find_stream_name_by_subject(target.subject)
        except NotFoundError:
            raise NoStream(f"{target.url}: no JetStream stream holds subject "
                           f"{target.subject!r} (nothing was recorded there)") from None
        except Exception as e:  # JetStream off, or no answer
            raise NatsUnavailable(f"{target.server}: JetStream did not answer: "
                                  f"{describe(e)}") from None
        out = StreamRead(stream)
        info = await js.stream_info(stream, subjects_filter=target.subject)
        if (info.state.subjects or {}).get(target.subject, 0):
            await _consume(js, target, out, idle_timeout)
        return out
    finally:
        await nc.close()


async def _consume(js: Any, target: NatsTarget, out: StreamRead, idle_timeout: float) -> None:
    """Append every message of the subject to ``out`` until none is pending."""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import DeliverPolicy

    sub = await js.subscribe(target.subject, stream=out.stream, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except (NatsTimeout, TimeoutError):
                out.problems.append(f"stopped waiting: no message for {idle_timeout:g} s "
                                    "before the stream was read to its end")
                return
            meta = msg.metadata
            try:
                out.records.append(decode(msg.data, msg.headers))
            except BadMessage as e:
                out.note(meta.sequence.stream, str(e))
            if not meta.num_pending:
                break
    finally:
        await sub.unsubscribe()
    if out.bad > _SHOWN:
        out.problems.append(f"{out.bad - _SHOWN} more bad message(s) skipped")

