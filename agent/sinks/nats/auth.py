"""How the agent proves who it is to a NATS server, and how it checks who the server is.

Where each part comes from:

- the URL: ``tls://HOST:PORT/SUBJECT`` asks for TLS; ``nats://TOKEN@HOST...`` carries a
  token, ``nats://USER:PASSWORD@HOST...`` a user and password (percent-encoded where they
  hold ``@``, ``:``, ``/`` or ``%``);
- the flags: ``--nats-ca FILE`` (the CAs the server's certificate must chain to; default:
  the system's), ``--nats-cert FILE`` and ``--nats-key FILE`` (a client certificate, for
  mutual TLS), ``--nats-token-file FILE`` (the token, read at every connection attempt, so a
  rotated file is picked up at the next reconnect) and ``--nats-creds FILE`` (a NATS
  ``.creds`` file: a user JWT and its nkey seed, read at every attempt by nats-py; needs
  the ``nkeys`` package).

TLS is used when the URL says ``tls://`` or any of ``--nats-ca``/``--nats-cert``/
``--nats-key`` is given; the server's certificate must then chain to the CA and name the
URL's host (an IP address as an IP SAN). A server that does not require TLS is refused
before any token or password is sent (nats-py alone would fall back to plain text).

At most one credential: a token (URL or file), a user and password, or a creds file.
Nothing here logs or shows a secret: :class:`NatsAuth`'s repr leaves the token and the
password out, and :func:`describe` names kinds only.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["FLAGS", "NatsAuth", "read_token"]

#: Flag of each field given by a flag (messages name them).
FLAGS = {"ca_file": "--nats-ca", "cert_file": "--nats-cert", "key_file": "--nats-key",
         "token_file": "--nats-token-file", "creds_file": "--nats-creds"}
_CREDS_MARKERS = (b"BEGIN NATS USER JWT", b"BEGIN USER NKEY SEED")


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """TLS and credentials of one NATS connection (see the module doc). Values only:
    :meth:`check` looks at the files, :meth:`connect_options` makes nats-py's arguments."""

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token_file: str | None = None
    creds_file: str | None = None

    @property
    def uses_tls(self) -> bool:
        """Is the connection TLS (``tls://``, or a CA or client certificate given)?"""
        return self.tls or any((self.ca_file, self.cert_file, self.key_file))

    def credentials(self) -> list[str]:
        """The credentials given, by where they came from (for messages; no secrets)."""
        kinds = [("a token in the URL", self.token), ("a user in the URL", self.user),
                 ("--nats-token-file", self.token_file), ("--nats-creds", self.creds_file)]
        return [name for name, value in kinds if value is not None]

    def merged(self, flags: NatsAuth) -> NatsAuth:
        """This (the URL's part) with the flags' files added; ValueError (one line naming
        the flags) for a certificate without its key, or more than one credential."""
        given = {f.name: getattr(flags, f.name) for f in fields(flags)
                 if f.name in FLAGS and getattr(flags, f.name) is not None}
        out = replace(self, **given)
        if (out.cert_file is None) != (out.key_file is None):
            have, need = (("--nats-cert", "--nats-key") if out.cert_file is not None
                          else ("--nats-key", "--nats-cert"))
            raise ValueError(f"{have} needs {need} (a client certificate and its key)")
        creds = out.credentials()
        if len(creds) > 1:
            raise ValueError(f"{creds[0]} and {creds[1]}: give one NATS credential")
        return out

    def check(self) -> None:
        """The files are there, readable and what they should be; ValueError (one line
        naming the flag and the file) if not. Called at start (exit 2)."""
        for name, flag in FLAGS.items():
            path = getattr(self, name)
            if path is not None:
                _read(flag, path)
        if self.token_file is not None:
            read_token(self.token_file)
        if self.creds_file is not None:
            _check_creds(self.creds_file)
        if self.uses_tls:
            self._check_tls()

    def _check_tls(self) -> None:
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"--nats-ca {self.ca_file}: no CA certificate in it (PEM) "
                                 f"({_ssl_reason(e)})") from None
        if self.cert_file is not None:
            try:
                self.ssl_context()
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"--nats-cert {self.cert_file} --nats-key {self.key_file}: "
                                 "not a PEM certificate and its private key "
                                 f"({_ssl_reason(e)})") from None

    def ssl_context(self) -> ssl.SSLContext:
        """The client's TLS context: the server verified against ``ca_file`` (or the
        system's CAs), host name checked, the client certificate loaded if given."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def connect_options(self, tls_checked: Callable[[], None]) -> dict[str, Any]:
        """nats-py's ``connect`` arguments for TLS and the credential. Files are read at
        every connection attempt. ``tls_checked`` runs right before a token or password is
        sent (it raises if TLS was asked for and the connection is not TLS)."""
        kw: dict[str, Any] = {}
        if self.uses_tls:
            kw["tls"] = self.ssl_context()
        if self.token is not None or self.token_file is not None:
            token, path = self.token or "", self.token_file

            def give_token() -> str:
                tls_checked()
                return token if path is None else read_token(path)

            kw["token"] = give_token
        if self.user is not None:
            user = self.user

            def give_user() -> str:
                tls_checked()
                return user

            kw["user"], kw["password"] = give_user, self.password or ""
        if self.creds_file is not None:
            kw["user_credentials"] = self.creds_file
        return kw


def read_token(path: str) -> str:
    """The token in file ``path`` (surrounding whitespace stripped); ValueError naming
    ``--nats-token-file`` and the file if it cannot be read, is empty or has two lines."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--nats-token-file {path}: cannot read it "
                         f"({getattr(e, 'strerror', None) or e})") from None
    if not token:
        raise ValueError(f"--nats-token-file {path} is empty")
    if "\n" in token or "\r" in token:
        raise ValueError(f"--nats-token-file {path}: more than one line (one token)")
    return token


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def _check_creds(path: str) -> None:
    """A NATS credentials file: a user JWT and a user nkey seed; and nkeys to sign with."""
    data = _read("--nats-creds", path)
    missing = [m.decode() for m in _CREDS_MARKERS if m not in data]
    if missing:
        raise ValueError(f"--nats-creds {path}: not a NATS credentials file (no "
                         f"'{missing[0]}' section)")
    try:
        import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
    except ImportError:
        raise ValueError("--nats-creds needs the Python package nkeys, which is not "
                         "installed (pip install nkeys)") from None


def _ssl_reason(e: BaseException) -> str:
    """The short reason of an ssl or OS error (``KEY_VALUES_MISMATCH``, ...)."""
    reason = getattr(e, "reason", None)
    if isinstance(e, ssl.SSLError) and reason:
        return str(reason)
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
