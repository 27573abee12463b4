"""A NATS server with JetStream for tests (test helper): Debian's ``nats-server -js`` on
127.0.0.1 with a store directory of the test's own, started and stopped by PID (never by
name). ``prefix`` runs it inside a network namespace (``ip netns exec NAME``, which execs:
the PID is the server's). ``config`` adds a configuration file (``-c``; TLS, authorization,
operator mode), written with :func:`write_config`; the flags still set the address and the
port, and JetStream with the store unless the file has a ``jetstream`` block of its own
(needed to :meth:`NatsServer.reload`: a reload keeps only what the file says).

Throwaway security material for those files: :func:`make_tls` (a CA, a server certificate
for 127.0.0.1 and a client certificate, made with the ``openssl`` command) and
:func:`make_operator` (an operator, an account with JetStream and a user's ``.creds`` file,
the JWTs signed with the ``cryptography`` package: no ``nsc`` needed).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)

#: Skip a test that needs the server where it is not installed ("make setup" installs it).
needs_server = pytest.mark.skipif(SERVER is None, reason="nats-server is not installed "
                                  "(run 'make setup')")
#: Skip a test that needs :func:`make_tls` where there is no ``openssl`` command.
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command is not installed")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """``nats-server -js`` on 127.0.0.1:``port`` storing in ``store``; :meth:`start` waits
    until it is ready. :meth:`kill` (SIGKILL) and :meth:`stop` (SIGTERM) act on its PID."""

    def __init__(self, store: Path, port: int | None = None,
                 prefix: Sequence[str] = (), config: Path | None = None) -> None:
        assert SERVER is not None, "nats-server is not installed"
        self.store = store
        self.port = port or free_port()
        self.prefix = list(prefix)
        self.config = config
        self.log = store.parent / f"{store.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> NatsServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            conf = ["-c", str(self.config)] if self.config is not None else []
            own = self.config is not None and "jetstream" in self.config.read_text()
            js = [] if own else ["-js", "-sd", str(self.store)]
            self.proc = subprocess.Popen(
                [*self.prefix, str(SERVER), *conf, *js, "-a", "127.0.0.1", "-p",
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "Server is ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def reload(self, timeout: float = 10) -> None:
        """SIGHUP: the server reads its configuration file again; returns once it says so.
        The file needs a ``jetstream { store_dir: ... }`` block of its own, or the reload
        shuts JetStream down (``-js`` is a flag) or fails (a store directory differs)."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        done = self.log.read_text().count("Reloaded")
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log.read_text().count("Reloaded") <= done:
            assert time.monotonic() < deadline, f"no reload: {self.log.read_text()}"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the broker dies without a word."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always safe to call."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def write_config(path: Path, *blocks: str, store: Path | None = None) -> Path:
    """A nats-server configuration file of ``blocks`` at ``path``; with ``store``, JetStream
    storing there is in the file too (so that it survives :meth:`NatsServer.reload`)."""
    js = [f'jetstream {{ store_dir: "{store}" }}'] if store is not None else []
    path.write_text("\n".join([*blocks, *js]) + "\n")
    return path


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1 (and ``localhost``) and a client
    certificate, both signed by the CA; ``other_ca``: a CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def server_block(self, verify: bool = False) -> str:
        """The server's ``tls {}`` block; ``verify``: clients need a certificate of the CA."""
        return (f'tls {{\n  cert_file: "{self.server_cert}"\n  key_file: "{self.server_key}"\n'
                f'  ca_file: "{self.ca}"\n  verify: {"true" if verify else "false"}\n}}')


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def _signed(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem",
                               d / f"{name}.ext")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    extfile.write_text(ext + "\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extfile)
    return cert, key


def make_tls(d: Path) -> TlsFiles:
    """Throwaway TLS material in directory ``d`` (made if missing), with ``openssl``."""
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "ca")
    server = _signed(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                      "extendedKeyUsage=serverAuth")
    client = _signed(d, "client", ca, "extendedKeyUsage=clientAuth")
    return TlsFiles(ca[0], *server, *client, _ca(d, "other-ca")[0])


# ---------------------------------------------------------------- operator mode (JWT)

_PREFIX = {"O": 14 << 3, "A": 0, "U": 20 << 3}  # nkeys' prefix bytes
_SEED = 18 << 3


def _nkey_text(raw: bytes) -> str:
    """nkeys' encoding: base32 of the bytes and their CRC-16 (XMODEM, little-endian)."""
    crc = binascii.crc_hqx(raw, 0).to_bytes(2, "little")
    return base64.b32encode(raw + crc).decode().rstrip("=")


class _NKey:
    """An nkey pair of kind O (operator), A (account) or U (user)."""

    def __init__(self, kind: str) -> None:
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        seed = self.key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw,
                                      ser.NoEncryption())
        prefix = _PREFIX[kind]
        self.public = _nkey_text(bytes([prefix]) + raw)
        self.seed = _nkey_text(bytes([_SEED | prefix >> 5, (prefix & 31) << 3]) + seed)

    def sign_jwt(self, subject: str, name: str, nats: dict[str, Any]) -> str:
        """A NATS JWT (v2) about ``subject``, issued and signed by this key."""
        claims: dict[str, Any] = {"iat": int(time.time()), "iss": self.public, "name": name,
                                  "sub": subject, "nats": {**nats, "version": 2}}
        digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
        claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
        head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = _b64(json.dumps(claims).encode())
        return f"{head}.{body}.{_b64(self.key.sign(f'{head}.{body}'.encode()))}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_UNLIMITED = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn",
                              "leaf", "mem_storage", "disk_storage", "streams", "consumer")}


@dataclass(frozen=True)
class Operator:
    """Operator mode: ``block`` for the server's configuration (operator JWT, a memory
    resolver with the account preloaded); ``creds``: a user of that account;
    ``stranger_creds``: a user of an account the server does not know."""

    block: str
    creds: Path
    stranger_creds: Path


def _creds(path: Path, account: _NKey, name: str) -> Path:
    user = _NKey("U")
    jwt = account.sign_jwt(user.public, name, {"type": "user", "pub": {}, "sub": {},
                                               "subs": -1, "data": -1, "payload": -1})
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                    "************************* IMPORTANT *************************\n"
                    "NKEY Seed printed below can be used to sign and prove identity.\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n"
                    "------END USER NKEY SEED------\n")
    return path


def make_operator(d: Path) -> Operator:
    """An operator, a system account, an account with JetStream and a user's creds file in
    ``d``; needs the ``cryptography`` package."""
    d.mkdir(parents=True, exist_ok=True)
    op, system, account = _NKey("O"), _NKey("A"), _NKey("A")
    op_jwt = d / "operator.jwt"
    op_jwt.write_text(op.sign_jwt(op.public, "test", {"type": "operator",
                                                      "system_account": system.public}))
    accounts = {
        a.public: op.sign_jwt(a.public, name, {"type": "account", "limits": limits,
                                               "default_permissions": {"pub": {}, "sub": {}}})
        for a, name, limits in ((system, "SYS", {**_UNLIMITED, "mem_storage": 0,
                                                  "disk_storage": 0}),
                                (account, "mirror", {**_UNLIMITED, "wildcards": True}))}
    preload = "\n".join(f'  {key}: "{jwt}"' for key, jwt in accounts.items())
    block = (f'operator: "{op_jwt}"\nsystem_account: {system.public}\nresolver: MEMORY\n'
             f"resolver_preload: {{\n{preload}\n}}")
    return Operator(block, _creds(d / "user.creds", account, "agent"),
                    _creds(d / "stranger.creds", _NKey("A"), "stranger"))
