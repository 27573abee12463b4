"""``--record nats://`` with TLS and credentials (agent/sinks/nats/auth.py), against real
``nats-server`` processes on 127.0.0.1 configured with TLS (a throwaway CA made with openssl),
a token, users, and operator mode (JWTs signed here; a creds file needs the ``nkeys``
package on the agent's side).

For each: the right credential records and the records read back through the consumer; a
wrong one is refused at start with one line (:class:`NatsAuthError`, exit 1 from the command
line) and no retry loop. Secrets never show: not in URLs shown, ``config`` output, error
messages or the log. A refusal mid-run is an outage (``broker_down``) that ends when the
credential is right again.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.layers import parse_options, toml_lines
from agent.cli.outputs import OutputError, RunOutputs
from agent.cli.parser import UsageError
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.nats import NatsAuth, NatsAuthError, NatsRecorder, NatsTarget
from agent.sinks.nats.client import TlsNotOffered, refusal
from agent.sinks.nats.consumer import read_stream
from agent.sinks.nats.publisher import Settings
from agent.sinks.nats.url import parse_nats_url, redact_url
from tests.unit.nats_server import (
    NatsServer,
    TlsFiles,
    make_operator,
    make_tls,
    needs_server,
    write_config,
)

FAST = Settings(connect_timeout=1.0, drain_timeout=2.0, ack_timeout=2.0, backoff_max=0.3)
DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
SECRET = "s3cret-T0ken"


def _chunk(flow: int, data: bytes) -> TrafficChunk:
    return TrafficChunk(data, f"192.0.2.1:{40000 + flow}", "198.51.100.1:8080",
                        Direction.TO_OBSERVED, time.time(), flow, 0)


def _wait(cond: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _records_arrive(target: NatsTarget, flows: range = range(1, 4)) -> None:
    """Record a chunk and the end of each flow; they are acknowledged and read back."""
    rec = NatsRecorder(target, live=True, settings=FAST)
    for flow in flows:
        rec.write(_chunk(flow, b"GET /%d HTTP/1.1\r\n\r\n" % flow), b"GET /%d HTTP/1.1\r\n\r\n"
                  % flow)
        rec.flow_end(FlowEnd(flow, "fin"))
    rec.close()
    assert rec.stats()["records"] == 2 * len(flows), rec.stats()
    got = read_stream(target, connect_timeout=2)
    assert got.problems == []
    assert [r.data for r in got.records if r.data.startswith(b"GET")] == [
        b"GET /%d HTTP/1.1\r\n\r\n" % f for f in flows]


def _refused(target: NatsTarget, why: str) -> None:
    """The recorder refuses to start with one line naming the URL (no secret) and ``why``."""
    started = time.monotonic()
    with pytest.raises(NatsAuthError) as e:
        NatsRecorder(target, live=True, settings=FAST)
    assert time.monotonic() - started < 5  # one attempt, no retry loop
    assert str(e.value).startswith(f"{target.url}: ") and why in str(e.value)
    assert "\n" not in str(e.value) and SECRET not in str(e.value)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start a server with a configuration of these blocks (stopped by PID at the end)."""
    servers: list[NatsServer] = []

    def start(*blocks: str) -> NatsServer:
        n = len(servers)
        conf = write_config(tmp_path / f"server{n}.conf", *blocks)
        servers.append(NatsServer(tmp_path / f"store{n}", config=conf))
        return servers[-1].start()

    try:
        yield start
    finally:
        for s in servers:
            s.stop()


def _target(server: NatsServer, url: str = "", subject: str = "mirror.auth",
            **files: str | Path) -> NatsTarget:
    """The target of ``url`` (default: ``nats://127.0.0.1:PORT/SUBJECT``) with the files."""
    url = url.format(port=server.port) or f"nats://127.0.0.1:{server.port}/{subject}"
    given: dict[str, Any] = {k: str(v) for k, v in files.items()}
    flags = NatsAuth(**given) if files else None
    return parse_nats_url(url).with_flags(flags)


# ---------------------------------------------------------------- the URL and the flags


def test_url_takes_tls_and_a_credential_kept_out_of_what_is_shown() -> None:
    t = parse_nats_url(f"tls://{SECRET}@127.0.0.1:4333/a.b")
    assert t.auth.tls and t.auth.token == SECRET and t.auth.uses_tls
    assert (t.server, t.url) == ("tls://127.0.0.1:4333", "tls://127.0.0.1:4333/a.b")
    u = parse_nats_url("NATS://agent:p%40ss%2Fw:rd@[::1]/a")
    assert (u.auth.user, u.auth.password, u.auth.tls) == ("agent", "p@ss/w:rd", False)
    assert u.url == "nats://[::1]:4222/a"
    for shown in (repr(t), repr(u), t.url, u.url):
        assert SECRET not in shown and "p%40ss" not in shown and "p@ss" not in shown
    assert parse_nats_url("nats://h/s").with_flags(NatsAuth(ca_file="ca.pem")).url == \
        "tls://h:4222/s"  # a CA asks for TLS


@pytest.mark.parametrize(("url", "shown"), [
    (f"nats://{SECRET}@h:1/s", "nats://***@h:1/s"),
    ("tls://u:p@ss@h/s", "tls://***@h/s"),        # the last @ ends the credential
    ("nats://u:p/w@h:1/s", "nats://***@h:1/s"),   # a / in a password is no path yet
    ("nats://h:1/s", "nats://h:1/s"),
    ("/tmp/rec@1.bin", "/tmp/rec@1.bin"),          # a file is no URL
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_bad_urls_are_named_without_their_secret() -> None:
    for url in (f"nats://{SECRET}@h:1/a.*", f"nats://{SECRET}@h:99999/s",
                f"nats://{SECRET}@h:1/", f"nats://{SECRET}@h:1/s?x=1", "nats://@h:1/s"):
        with pytest.raises(ValueError) as e:
            parse_nats_url(url)
        assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_flags_come_from_toml_and_the_environment_and_config_shows_no_secret(
        tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'port = 8080\nrecord = "tls://{SECRET}@127.0.0.1:4222/m"\n'
                    'nats-ca = "/etc/ca.pem"\n')
    env = {"MIRROR_AGENT_NATS_CERT": "/etc/c.pem", "MIRROR_AGENT_NATS_KEY": "/etc/c.key"}
    opts = parse_options(["config", "--config", str(conf), "--iface", "lo"], environ=env)
    auth = opts.pipe.nats_auth
    assert auth == NatsAuth(ca_file="/etc/ca.pem", cert_file="/etc/c.pem",
                            key_file="/etc/c.key")
    text = "\n".join(toml_lines(opts.effective().items()))
    assert 'record = "tls://***@127.0.0.1:4222/m"' in text and SECRET not in text
    assert 'nats-cert = "/etc/c.pem"  # env MIRROR_AGENT_NATS_CERT' in text
    assert 'nats-ca = "/etc/ca.pem"  # config' in text
    opts = parse_options(["offline", "x.pcap", "--port", "1", "--record", "nats://h/s"],
                         environ={"MIRROR_AGENT_NATS_TOKEN_FILE": "/run/tok"})
    assert opts.pipe.nats_auth == NatsAuth(token_file="/run/tok")


@pytest.mark.parametrize(("args", "message"), [
    (["--record", "out.bin", "--nats-ca", "ca.pem"], "--nats-ca needs --record nats://"),
    (["--nats-creds", "u.creds"], "--nats-creds needs --record nats://"),
    (["--record", "nats://h/s", "--nats-cert", "c.pem"], "--nats-cert needs --nats-key"),
    (["--record", "nats://h/s", "--nats-key", "c.key"], "--nats-key needs --nats-cert"),
    (["--record", f"nats://{SECRET}@h/s", "--nats-token-file", "t"],
     "a token in the URL and --nats-token-file: give one NATS credential"),
    (["--record", "nats://u:p@h/s", "--nats-creds", "c"],
     "a user in the URL and --nats-creds: give one"),
    (["--record", f"nats://{SECRET}@h/s", "--record-compress", "gzip"],
     "--record-compress needs a file: --record nats://***@h/s publishes"),
])
def test_flag_combinations_are_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_options(["offline", "x.pcap", "--port", "1", *args])
    assert message in str(e.value) and SECRET not in str(e.value)


def _outputs(url: str, **files: str | Path) -> RunOutputs:
    given: dict[str, Any] = {k: str(v) for k, v in files.items()}
    auth = NatsAuth(**given)
    return RunOutputs(url, None, False, nats_auth=auth)


def test_files_are_checked_at_start(tmp_path: Path, tls: TlsFiles,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = "nats://127.0.0.1:1/s"
    empty, not_creds = tmp_path / "empty", tmp_path / "not.creds"
    empty.write_text("\n")
    not_creds.write_text("-----BEGIN NATS USER JWT-----\nx\n")
    cases: list[tuple[dict[str, str | Path], str]] = [
        ({"ca_file": tmp_path / "none"}, "--nats-ca {}: cannot read it (No such file"),
        ({"ca_file": tmp_path}, "--nats-ca {}: cannot read it (Is a directory)"),
        ({"ca_file": tls.client_key}, "--nats-ca {}: no CA certificate in it"),
        ({"cert_file": tls.client_cert, "key_file": tls.server_key},
         "--nats-cert {} --nats-key"),
        ({"token_file": empty}, "--nats-token-file {} is empty"),
        ({"creds_file": not_creds}, "--nats-creds {}: not a NATS credentials file"),
    ]
    for files, message in cases:
        with pytest.raises(OutputError) as e:
            _outputs(url, **files)
        assert str(e.value).startswith(message.format(next(iter(files.values())))), e.value
    good = tmp_path / "good.creds"
    good.write_text("BEGIN NATS USER JWT\nBEGIN USER NKEY SEED\n")
    monkeypatch.setitem(sys.modules, "nkeys", None)  # not installed
    with pytest.raises(OutputError, match="--nats-creds needs the Python package nkeys"):
        _outputs(url, creds_file=good)
    out = _outputs(url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    assert isinstance(out.record, NatsTarget) and out.record.auth.uses_tls


def test_refusals_are_told_apart_from_a_broker_that_is_down() -> None:
    import ssl

    from nats.errors import AuthorizationError, Error

    assert refusal(Error("nats: 'Authorization Violation'")) is not None
    assert refusal(AuthorizationError()) is not None
    assert refusal(TlsNotOffered("x")) is not None
    assert refusal(ssl.SSLError(1, "[SSL: X] bad certificate")) is not None
    for down in (ConnectionRefusedError(111, "refused"), TimeoutError(),
                 Error("nats: empty response from server when expecting INFO message")):
        assert refusal(down) is None


# ---------------------------------------------------------------- real servers


@needs_server
def test_tls_with_a_token_file(serve: Callable[..., NatsServer], tls: TlsFiles,
                               tmp_path: Path) -> None:
    server = serve(tls.server_block(), f'authorization {{ token: "{SECRET}" }}')
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text(SECRET + "\n")
    wrong.write_text("not-it\n")
    url = "tls://127.0.0.1:{port}/mirror.tls"
    _records_arrive(_target(server, url, ca_file=tls.ca, token_file=token))
    _refused(_target(server, url, ca_file=tls.ca, token_file=wrong), "authorization violation")
    _refused(_target(server, url, ca_file=tls.ca), "authorization violation")  # none given
    _refused(_target(server, url, token_file=token), "certificate is not trusted")
    _refused(_target(server, url, ca_file=tls.other_ca, token_file=token),
             "certificate is not trusted")
    # A plain nats:// URL: nats-py follows the server into TLS, verified all the same.
    _refused(_target(server, f"nats://{SECRET}@127.0.0.1:{{port}}/s"), "--nats-ca")
    _records_arrive(_target(server, f"nats://{SECRET}@127.0.0.1:{{port}}/mirror.tls2",
                            ca_file=tls.ca))


@needs_server
def test_mutual_tls(serve: Callable[..., NatsServer], tls: TlsFiles) -> None:
    server = serve(tls.server_block(verify=True))
    url = "tls://127.0.0.1:{port}/mirror.mtls"
    _records_arrive(_target(server, url, ca_file=tls.ca, cert_file=tls.client_cert,
                            key_file=tls.client_key))
    # Without a client certificate: the server's alert, or its reset (TLS 1.3 checks the
    # client certificate after the handshake; which of the two arrives first is a race).
    started = time.monotonic()
    with pytest.raises(NatsAuthError) as e:
        NatsRecorder(_target(server, url, ca_file=tls.ca), live=True, settings=FAST)
    assert time.monotonic() - started < 5
    assert "client certificate" in str(e.value) or "TLS handshake failed" in str(e.value)


@needs_server
def test_user_and_password(serve: Callable[..., NatsServer]) -> None:
    server = serve('authorization { users = [ {user: agent, password: "p@ss/w:rd"} ] }')
    _records_arrive(_target(server, "nats://agent:p%40ss%2Fw%3Ard@127.0.0.1:{port}/m.up"))
    _refused(_target(server, "nats://agent:wrong@127.0.0.1:{port}/m.up"),
             "authorization violation")
    _refused(_target(server, "nats://other:p%40ss%2Fw%3Ard@127.0.0.1:{port}/m.up"),
             "authorization violation")


@needs_server
def test_creds_file_in_operator_mode(serve: Callable[..., NatsServer], tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="signing the test's JWTs needs cryptography")
    pytest.importorskip("nkeys", reason="a creds file needs the nkeys package (pip install "
                                        "nkeys; nats-py signs the server's nonce with it)")
    op = make_operator(tmp_path / "operator")
    server = serve(op.block)
    _records_arrive(_target(server, creds_file=op.creds))
    _refused(_target(server, creds_file=op.stranger_creds), "authorization violation")
    _refused(_target(server), "authorization violation")


def _plain_server(received: bytearray) -> tuple[socket.socket, threading.Thread]:
    """A fake NATS server that offers no TLS and keeps every byte a client sends it."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            conn.sendall(b'INFO {"server_id":"fake","version":"2.9.10","proto":1,'
                         b'"max_payload":1048576,"auth_required":true}\r\n')
            conn.settimeout(3)
            try:
                while data := conn.recv(4096):
                    received.extend(data)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ls, thread


def test_tls_asked_of_a_server_without_tls_sends_no_credential() -> None:
    received = bytearray()
    ls, thread = _plain_server(received)
    try:
        port = ls.getsockname()[1]
        _refused(parse_nats_url(f"tls://{SECRET}@127.0.0.1:{port}/s"),
                 "the server does not offer TLS")
        thread.join(5)
    finally:
        ls.close()
    assert SECRET.encode() not in received


@needs_server
def test_refused_mid_run_is_an_outage_until_the_credential_is_right_again(
        tmp_path: Path) -> None:
    store = tmp_path / "store"  # JetStream in the file: a reload keeps only what it says
    conf = write_config(tmp_path / "server.conf", f'authorization {{ token: "{SECRET}" }}',
                        store=store)
    server = NatsServer(store, config=conf).start()
    try:
        token = tmp_path / "token"
        token.write_text(SECRET)
        target = _target(server, subject="mirror.rotate", token_file=token)
        rec = NatsRecorder(target, live=True, settings=FAST)
        rec.write(_chunk(1, b"before"), b"before")
        rec.flush()
        write_config(conf, 'authorization { token: "rotated" }', store=store)
        server.reload()  # the agent's token is no good now: the server drops it
        _wait(lambda: rec.stats()["nats_connected"] == 0)
        _wait(lambda: rec.stats()["nats_connect_failures"] >= 2)  # retried, refused
        rec.write(_chunk(2, b"during"), b"during")
        _wait(lambda: rec.stats()["nats_dropped_records_broker_down"] >= 1)
        token.write_text("rotated\n")  # read again at the next attempt
        _wait(lambda: rec.stats()["nats_connected"] == 1)
        rec.write(_chunk(2, b"after"), b"after")  # owes the lost record as a gap
        rec.close()
        got = read_stream(target)
    finally:
        server.stop()
    assert [r.data for r in got.records] == [b"before", b"after"]
    assert got.records[1].gap_bytes == len(b"during")  # the outage is a gap, not a hole


# ---------------------------------------------------------------- the command line


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "--log-format", "json",
                           "offline", str(DEMO), "--port", "8080", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@needs_server
def test_command_line_right_wrong_and_missing(serve: Callable[..., NatsServer], tls: TlsFiles,
                                              tmp_path: Path) -> None:
    server = serve(tls.server_block(), f'authorization {{ token: "{SECRET}" }}')
    url = f"tls://{SECRET}@127.0.0.1:{server.port}/mirror.cli"
    stats = tmp_path / "stats.json"
    res = _cli("--record", url, "--nats-ca", tls.ca, "--stats-json", stats)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stderr + stats.read_text()
    assert json.loads(stats.read_text())["mirror_agent_record_connections_completed_total"] == 7
    got = read_stream(_target(server, url, ca_file=tls.ca))
    assert len({r.flow_id for r in got.records}) == 7
    wrong = url.replace(SECRET, "wrong")
    res = _cli("--record", wrong, "--nats-ca", tls.ca)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr == (f"mirror-agent: failed: NatsAuthError: tls://127.0.0.1:{server.port}"
                          "/mirror.cli: authorization violation (a wrong or missing "
                          "credential)\n")
    res = _cli("--record", url, "--nats-ca", tmp_path / "missing.pem")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "--nats-ca" in res.stderr and SECRET not in res.stderr
