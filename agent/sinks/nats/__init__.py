"""Fleet recording to NATS JetStream: ``--record nats://HOST:PORT/SUBJECT`` publishes every
record (the native format's record as the message body, the flow's metadata in headers) to
a JetStream stream; ``mirror-agent replay nats://HOST:PORT/SUBJECT`` reads it back.

The pieces: :mod:`.url` (the URL, the stream's name; no client library needed),
:mod:`.auth` (TLS and credentials: ``tls://``, ``TOKEN@``/``USER:PASSWORD@``, ``--nats-*``
files), :mod:`.client` (one connection attempt; a refusal is :class:`NatsAuthError`),
:mod:`.message` (a record as a message and back), :mod:`.gaps` (dropped records become gaps),
:mod:`.recorder` (the writer the mirror calls), :mod:`.publisher` (its asyncio thread:
connection, bounded in-flight publishes, acknowledgements, reconnects) and :mod:`.consumer`
(reading a stream from its start until caught up, for replay).

Only :mod:`.publisher` and :mod:`.consumer` import nats-py, and only when they run.
"""

from agent.sinks.nats.auth import NatsAuth
from agent.sinks.nats.client import NatsAuthError
from agent.sinks.nats.recorder import NatsRecorder
from agent.sinks.nats.url import (
    NatsTarget,
    is_nats_url,
    parse_nats_url,
    redact_url,
    stream_name,
)

__all__ = ["NatsAuth", "NatsAuthError", "NatsRecorder", "NatsTarget", "is_nats_url",
           "parse_nats_url", "redact_url", "stream_name"]
