"""``nats://HOST[:PORT]/SUBJECT``: where a fleet recording goes to, or a replay comes from.

``tls://`` instead of ``nats://`` asks for TLS, and a token (``nats://TOKEN@HOST...``) or a
user and password (``nats://USER:PASSWORD@HOST...``, percent-encoded) may come before the
host (:mod:`agent.sinks.nats.auth`). They are kept in :attr:`NatsTarget.auth`, never in
:attr:`NatsTarget.url`; :func:`redact_url` is the URL as it may be shown (logs, ``config``,
``/status``, error messages).

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
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from agent.sinks.nats.auth import NatsAuth

__all__ = ["DEFAULT_PORT", "NatsTarget", "is_nats_url", "parse_nats_url", "redact_url",
           "stream_name"]

DEFAULT_PORT = 4222
SCHEME = "nats://"
SCHEMES = (SCHEME, "tls://")
_TOKEN = re.compile(r"[A-Za-z0-9_\-$:]+")  # a subject token: no '.', wildcards or spaces
_NOT_STREAM = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """A NATS server and a subject (no wildcards): one recording; ``auth``: how to connect
    (TLS, a credential)."""

    host: str
    port: int
    subject: str
    auth: NatsAuth = field(default_factory=NatsAuth)

    @property
    def server(self) -> str:
        """The server URL for the client (``nats://host:port``, or ``tls://`` with TLS; IPv6
        in brackets; never a credential)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "tls" if self.auth.uses_tls else "nats"
        return f"{scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL as given back (``nats://host:port/subject``, no credential): what
        messages name."""
        return f"{self.server}/{self.subject}"

    def with_flags(self, flags: NatsAuth | None) -> NatsTarget:
        """This target with the files the ``--nats-*`` flags name; ValueError (one line) if
        they do not go with the URL (:meth:`NatsAuth.merged`)."""
        if flags is None:
            return self
        return replace(self, auth=self.auth.merged(flags))

    @property
    def stream(self) -> str:
        """The name of the stream created for this subject if none captures it yet."""
        return stream_name(self.subject)


def is_nats_url(text: str) -> bool:
    """Does ``text`` name a NATS recording (``nats://...`` or ``tls://...``)?
    Case-insensitive scheme."""
    return text[:7].lower().startswith(SCHEMES)


def redact_url(text: str) -> str:
    """``text`` as it may be shown: a NATS URL's credential (everything between ``//`` and
    the last ``@``; a subject has no ``@``) becomes ``***``. Other text is returned as is."""
    if not is_nats_url(text):
        return text
    head, _, rest = text.partition("//")
    if "@" not in rest:
        return text
    return f"{head}//***@{rest.rpartition('@')[2]}"


def stream_name(subject: str) -> str:
    """The stream name derived from ``subject``: characters JetStream does not allow in a
    name (``.``, ``*``, ``>``, spaces, path separators, ...) become ``_``."""
    return _NOT_STREAM.sub("_", subject)


def parse_nats_url(text: str) -> NatsTarget:
    """``nats://[CREDENTIAL@]HOST[:PORT]/SUBJECT`` or ``tls://...`` (port default 4222);
    ValueError with one readable line, the URL redacted (:func:`redact_url`), naming what is
    wrong: another scheme, no host, a bad port, an empty credential, a query or fragment, no
    subject, or a subject that is not a plain dotted name (empty tokens, wildcards
    ``*``/``>``, spaces)."""
    shown = redact_url(text)
    if not is_nats_url(text):
        raise ValueError(f"{shown!r} is not a nats:// URL (or tls://)")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{shown}: {e}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{shown}: a NATS URL takes no query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown}: no host (nats://HOST:PORT/SUBJECT)")
    if port == 0:
        raise ValueError(f"{shown}: port 0")
    subject = parts.path.removeprefix("/")
    if not subject:
        raise ValueError(f"{shown}: no subject (nats://HOST:PORT/SUBJECT)")
    bad = [t for t in subject.split(".") if not _TOKEN.fullmatch(t)]
    if bad:
        raise ValueError(f"{shown}: subject {subject!r} is not a dotted name without "
                         "wildcards or spaces")
    auth = _url_auth(parts.scheme.lower() == "tls", parts.username, parts.password, shown)
    return NatsTarget(host, port or DEFAULT_PORT, subject, auth)


def _url_auth(tls: bool, user: str | None, password: str | None, shown: str) -> NatsAuth:
    """The URL's part of the connection's security: TLS, and a token (``TOKEN@``) or a user
    and password (``USER:PASSWORD@``), percent-decoded."""
    if user is None:
        return NatsAuth(tls=tls)
    if not user:
        raise ValueError(f"{shown}: an empty credential before '@'")
    if password is None:
        return NatsAuth(tls=tls, token=unquote(user))
    return NatsAuth(tls=tls, user=unquote(user), password=unquote(password))
