"""``nats://HOST[:PORT]/SUBJECT``: where a fleet recording goes to, or a replay comes from.

Pure parsing, no client library: the command line checks a URL before anything starts
(a bad one is exit 2, one line), and :class:`NatsTarget` is what the outputs hand the mirror.

The stream: the JetStream stream that already captures ``SUBJECT`` if there is one (an
operator's own, with its limits); otherwise the recorder creates one named
:attr:`NatsTarget.stream` (file storage, the server's default limits): the subject with every
character other than ``A-Z a-z 0-9 _ -`` replaced by ``_`` (``mirror.test`` → stream
``mirror_test``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DEFAULT_PORT", "NatsTarget", "is_nats_url", "parse_nats_url", "stream_name"]

DEFAULT_PORT = 4222
SCHEME = "nats://"
_TOKEN = re.compile(r"[A-Za-z0-9_\-$:]+")  # a subject token: no '.', wildcards or spaces
_NOT_STREAM = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """A NATS server and a subject (no wildcards): one recording."""

    host: str
    port: int
    subject: str

    @property
    def server(self) -> str:
        """The server URL for the client (``nats://host:port``, IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL as given back (``nats://host:port/subject``): what messages name."""
        return f"{self.server}/{self.subject}"

    @property
    def stream(self) -> str:
        """The name of the stream created for this subject if none captures it yet."""
        return stream_name(self.subject)


def is_nats_url(text: str) -> bool:
    """Does ``text`` name a NATS recording (``nats://...``)? Case-insensitive scheme."""
    return text[: len(SCHEME)].lower() == SCHEME


def stream_name(subject: str) -> str:
    """The stream name derived from ``subject``: characters JetStream does not allow in a
    name (``.``, ``*``, ``>``, spaces, path separators, ...) become ``_``."""
    return _NOT_STREAM.sub("_", subject)


def parse_nats_url(text: str) -> NatsTarget:
    """``nats://HOST[:PORT]/SUBJECT`` (port default 4222); ValueError with one readable line
    naming what is wrong: another scheme, no host, a bad port, credentials (not supported),
    a query or fragment, no subject, or a subject that is not a plain dotted name (empty
    tokens, wildcards ``*``/``>``, spaces)."""
    if not is_nats_url(text):
        raise ValueError(f"{text!r} is not a nats:// URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text}: {e}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ValueError(f"{text}: a NATS URL takes no query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError(f"{text}: no host (nats://HOST:PORT/SUBJECT)")
    if port == 0:
        raise ValueError(f"{text}: port 0")
    subject = parts.path.removeprefix("/")
    if not subject:
        raise ValueError(f"{text}: no subject (nats://HOST:PORT/SUBJECT)")
    bad = [t for t in subject.split(".") if not _TOKEN.fullmatch(t)]
    if bad:
        raise ValueError(f"{text}: subject {subject!r} is not a dotted name without "
                         "wildcards or spaces")
    return NatsTarget(host, port or DEFAULT_PORT, subject)

