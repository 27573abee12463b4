"""Connecting to a NATS server with nats-py (imported only when a connection is made), with
the target's TLS and credential (:mod:`agent.sinks.nats.auth`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from agent.sinks.nats.url import NatsTarget

__all__ = ["NatsAuthError", "TlsNotOffered", "connect", "describe", "refusal"]


class NatsAuthError(ConnectionError):
    """The server and the agent do not accept each other: a wrong or missing credential, or
    TLS that failed (the server's certificate not trusted, no client certificate, a server
    without TLS). Trying again does not help; :attr:`why` is the cause (no secret in it)."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.why = why


class TlsNotOffered(OSError):
    """TLS was asked for but the server does not require it (raised before a credential
    would be sent in plain text; an OSError so that nats-py ends the attempt with it)."""


async def connect(target: NatsTarget, timeout: float, name: str, **callbacks: Any) -> object:
    """A nats-py connection to ``target``'s server, without nats-py's own reconnecting
    (callers reconnect themselves, or not at all): one attempt of at most ``timeout``
    seconds per step. Raises :class:`NatsAuthError` if the server refused the agent or TLS
    failed (:func:`refusal`), ConnectionError naming the cause for anything else."""
    from nats.aio.client import Client

    errors: list[BaseException] = []

    async def note(e: BaseException) -> None:
        errors[:] = [e]  # the last one only

    nc: Any = Client()
    _quiet_asyncio_tls_eof()  # TLS may be the server's choice too

    def tls_checked() -> None:
        if target.auth.uses_tls and not nc._server_info.get("tls_required"):
            raise TlsNotOffered("the server does not offer TLS")

    failed: list[bool] = []
    try:
        await nc.connect(
            servers=[target.server], allow_reconnect=False, max_reconnect_attempts=1,
            reconnect_time_wait=0, connect_timeout=timeout, name=name, error_cb=note,
            dont_randomize=True,  # one server: no shuffle of the global random state
            **target.auth.connect_options(tls_checked), **_unless(failed, callbacks))
        tls_checked()  # no credential was sent, but nothing is published in plain text either
    except Exception as e:
        failed.append(True)  # closing it is not the loss of a connection: no callbacks
        # nats-py leaves a failed attempt's socket open; after a failed TLS handshake its
        # close() waits forever, hence the bound.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), min(timeout, 0.5))
        cause = errors[-1] if errors else e
        why = refusal(e) or refusal(cause) or _reset_in_tls(target, e, cause)
        if why is not None:
            raise NatsAuthError(target.server, why) from None
        text = str(cause) or type(cause).__name__
        raise ConnectionError(f"cannot reach {target.server}: {text}") from None
    return nc


def _reset_in_tls(target: NatsTarget, *errors: BaseException) -> str | None:
    """A reset (or a broken pipe, an EOF) while connecting over TLS without a client
    certificate: under TLS 1.3 a server that wants one closes the connection after the
    handshake, and its alert is often lost to the reset. A server that is down refuses the
    connection instead."""
    auth = target.auth
    if not auth.uses_tls or auth.cert_file is not None:
        return None
    if any(isinstance(e, ConnectionResetError | BrokenPipeError)
           or any(w in str(e).lower() for w in ("reset by peer", "broken pipe", "eof"))
           for e in errors):
        return ("TLS: the server reset the connection during the handshake (does it want a "
                "client certificate? --nats-cert/--nats-key)")
    return None


def _unless(failed: list[bool], callbacks: dict[str, Any]) -> dict[str, Any]:
    """``callbacks`` with each ``*_cb`` doing nothing once ``failed`` is not empty."""
    def guarded(cb: Any) -> Any:
        async def call(*args: Any) -> None:
            if not failed:
                await cb(*args)
        return call

    return {k: guarded(v) if k.endswith("_cb") and callable(v) else v
            for k, v in callbacks.items()}


def _quiet_asyncio_tls_eof() -> None:
    """Drop asyncio's "returning true from eof_received() has no effect when using ssl"
    warning: nats-py upgrades a plain stream to TLS, so the stream's protocol does not know
    it is over TLS and says so when the server closes the connection. Harmless, and it would
    be a line on stderr at every disconnect."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _TlsEofFilter) for f in logger.filters):
        logger.addFilter(_TlsEofFilter())


class _TlsEofFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


def refusal(e: BaseException) -> str | None:
    """Why ``e`` (a failed connection attempt) means the server and the agent do not accept
    each other, in one line without secrets; None if it is anything else (the server down,
    unreachable, slow, not NATS: worth trying again)."""
    if isinstance(e, TlsNotOffered):
        return ("the server does not offer TLS (asked for by tls:// or --nats-ca/--nats-cert); "
                "no credential was sent")
    if isinstance(e, ssl.SSLCertVerificationError):
        hint = " (give its CA with --nats-ca)" if "issuer" in str(e) else ""
        detail = getattr(e, "verify_message", None) or str(e)
        return f"TLS: the server's certificate is not trusted: {detail}{hint}"
    if isinstance(e, ssl.SSLError):
        reason = (getattr(e, "reason", None) or str(e)).lower().replace("_", " ")
        hint = (" (does the server want a client certificate? --nats-cert/--nats-key)"
                if "certificate" in reason else "")
        return f"TLS handshake failed: {reason}{hint}"
    text = str(e).lower()
    if type(e).__name__ == "AuthorizationError" or "authorization violation" in text:
        return "authorization violation (a wrong or missing credential)"
    if "authentication expired" in text:
        return "authentication expired (the credential is out of date)"
    return None


def describe(e: BaseException | None) -> str:
    """``Type: message`` of an exception (the type alone if it has no message)."""
    text = str(e) if e is not None else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
