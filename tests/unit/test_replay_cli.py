"""``mirror-agent replay`` on the command line: options, exit status, the report."""

from __future__ import annotations

import contextlib
import gzip
import json
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.cli.layers import parse_options
from agent.model import FlowEnd
from agent.replay.diff import DEFAULT_IGNORED
from agent.replay.sources import nats_url
from agent.sinks.nats import NatsAuth, NatsRecorder
from agent.sinks.nats.publisher import Settings
from agent.sinks.nats.url import parse_nats_url
from tests.unit.nats_server import (
    NatsServer,
    free_port,
    make_tls,
    needs_openssl,
    needs_server,
    write_config,
)
from tests.unit.replay_util import chunk, http_items, write_native


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 500 if self.path.startswith("/fail") else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_options(tmp_path: Path) -> None:
    opts = parse_options(["replay", "a.bin", "b.bin", "--target", "h:1", "--speed", "max",
                          "--connections", "8", "--ignore-headers=X-A,X-B",
                          "--source-ports", "any"], environ={})
    r = opts.replay
    assert r is not None
    assert (r.sources, r.plan.speed, r.plan.connections) == (
        (Path("a.bin"), Path("b.bin")), float("inf"), 8)
    assert (r.ignore_headers, r.plan.source_ports, r.plan.pipeline) == (
        ("X-A", "X-B"), None, False)
    conf = tmp_path / "c.toml"
    conf.write_text('target = "h:2"\nspeed = 2.5\nconnections = 3\n')
    r = parse_options(["replay", "a.bin", "--config", str(conf)], environ={}).replay
    assert r is not None and (r.plan.target, r.plan.speed, r.plan.connections) == ("h:2", 2.5, 3)
    assert r.ignore_headers == DEFAULT_IGNORED and r.plan.source_ports == (61000, 65535)


@pytest.mark.parametrize(("args", "message"), [
    (["--speed", "0"], "argument --speed: '0' must be a factor above 0"),
    (["--speed", "fast"], "argument --speed: 'fast' is not a number or 'max'"),
    (["--connections", "0"], "argument --connections: 0 must be at least 1"),
    (["--target", "http://x:1"], "without a scheme"),
    (["--ignore-headers=Bad Name"], "argument --ignore-headers"),
])
def test_bad_flags_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(1, 1))
    assert main(["replay", str(rec), "--target", "127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_target_or_source_exit_2(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(1, 1))
    assert main(["replay", str(rec)]) == 2
    assert "--target is required" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nope.bin"), "--target", "127.0.0.1:1"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_replay_reports_and_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(4, 10, paths=("/a", "/fail")))
    report = tmp_path / "report.json"
    with http_server() as target:
        status = main(["--log-level", "warning", "replay", str(rec), "--target", target,
                       "--speed", "max", "--report-json", str(report),
                       "--source-ports", "any"])
    assert status == 0
    out = capsys.readouterr().out
    assert "40 requests on 4 recorded connection(s)" in out
    assert "GET /fail: 20/20  status 200 -> 500 x20" in out
    rep = json.loads(report.read_text())
    assert rep["target"]["status"] == {"200": 20, "500": 20}
    assert rep["diff"]["paths"][0]["path"] == "GET /fail"


def test_damaged_source_and_refusing_target_exit_3(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(2, 3))
    rec.write_bytes(rec.read_bytes()[:-7])
    with http_server() as target:
        assert main(["--log-level", "error", "replay", str(rec), "--target", target,
                     "--speed", "max"]) == 3
    assert "source problem" in capsys.readouterr().out
    rec2 = tmp_path / "ok.bin"
    write_native(rec2, http_items(3, 1))
    assert main(["--log-level", "error", "replay", str(rec2), "--target", "127.0.0.1:1",
                 "--speed", "max", "--report-json", "-"]) == 3
    cap = capsys.readouterr()
    assert json.loads(cap.out)["target"]["connections"]["failed"] == {"refused": 3}
    assert "0 ok, 3 failed (refused 3)" in cap.err


# ------------------------------------------------------------ issue 19: bad inputs and outputs


@pytest.mark.parametrize("how", ["same", "symlink", "stdin", "overwrite"])
def test_a_report_path_that_is_the_input_is_refused(tmp_path: Path, how: str) -> None:
    """Before: ``--report-json rec.bin`` wrote rec.1.bin beside the input (with
    ``--overwrite``, over it). Now: exit 2, one line, nothing written."""
    rec = tmp_path / "rec.bin"
    write_native(rec, http_items(1, 1))
    before = rec.read_bytes()
    report = tmp_path / "link.bin" if how == "symlink" else rec
    if how == "symlink":
        report.symlink_to(rec)
    source = "-" if how == "stdin" else str(rec)
    extra = ["--overwrite"] if how == "overwrite" else []
    with rec.open("rb") as stdin:
        res = subprocess.run([sys.executable, "-m", "agent.cli", "replay", source, "--target",
                              "127.0.0.1:1", "--report-json", str(report), *extra],
                             stdin=stdin, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "is the replay's input" in res.stderr
    assert res.stdout == "" and rec.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({rec.name, report.name})


@pytest.mark.parametrize("compressed", [False, True])
def test_an_unsupported_recording_version_is_bad_input(tmp_path: Path, compressed: bool,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Before: replay read nothing, reported a source problem and exited 3. Now: exit 2
    with one line naming the version, before anything replays; inspect alike."""
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(1, 2))
    raw = bytearray(rec.read_bytes())
    struct.pack_into("<H", raw, 8, 2)  # the file header's version
    rec.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
    assert main(["replay", str(rec), "--target", "127.0.0.1:1", "--speed", "max"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "recording version 2 is not supported (this mirror-agent reads version 1)" in err
    assert main(["inspect", str(rec)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "recording version 2" in err


def test_a_native_header_cut_short_is_bad_input(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "r.bin"
    rec.write_bytes(b"MIRRORAG\x01")
    assert main(["replay", str(rec), "--target", "127.0.0.1:1"]) == 2
    assert "file header is cut short" in capsys.readouterr().err


def test_loop_refuses_a_source_read_once(tmp_path: Path) -> None:
    """``--loop`` reads the sources again each pass: standard input cannot be (the
    recording is no longer held in memory)."""
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(1, 1))
    with rec.open("rb") as stdin:
        res = subprocess.run([sys.executable, "-m", "agent.cli", "replay", "-", "--target",
                              "127.0.0.1:1", "--loop"], stdin=stdin, capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--loop reads the sources again" in res.stderr


def test_loop_reads_a_file_again_each_pass(tmp_path: Path) -> None:
    rec = tmp_path / "r.bin"
    write_native(rec, http_items(2, 3, step=0.001))
    report = tmp_path / "rep.json"
    with http_server() as target:
        assert main(["--log-level", "warning", "replay", str(rec), "--target", target,
                     "--loop", "--duration", "1", "--report-json", str(report),
                     "--source-ports", "any"]) == 0
    rep = json.loads(report.read_text())
    assert rep["source"]["requests"] == 6  # the recording's, once
    assert rep["target"]["requests_sent"] > 6 and not rep["source"]["problems"]


# ------------------------------------------------- a NATS recording over TLS (tls://...)


@pytest.mark.parametrize("scheme", ["tls", "nats", "TLS"])
def test_a_nats_url_source_is_read_from_nats_not_as_a_file(
        scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the argument became a Path (``tls:/127.0.0.1:PORT/subj``, one slash) and only
    ``nats:/`` was turned back into a URL, so ``tls://`` was exit 2 "cannot read tls:/...".
    Now both schemes are NATS sources: a server that is not there is exit 1, named."""
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}/mirror.replay"
    r = parse_options(["replay", url, "--target", "127.0.0.1:1"], environ={}).replay
    assert r is not None
    [source] = r.sources
    assert nats_url(source) == f"{scheme.lower()}://127.0.0.1:{port}/mirror.replay"
    assert main(["replay", url, "--target", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" not in err
    assert f"NatsUnavailable: cannot reach {scheme.lower()}://127.0.0.1:{port}" in err


@needs_server
@needs_openssl
def test_replay_from_a_tls_nats_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording made with ``--record tls://...`` replays from ``tls://...``, the server's
    certificate verified against the system's CAs (here the test CA, by SSL_CERT_FILE)."""
    tls = make_tls(tmp_path / "tls")
    server = NatsServer(tmp_path / "store",
                        config=write_config(tmp_path / "server.conf", tls.server_block()))
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}/mirror.replay"
        rec = NatsRecorder(parse_nats_url(url).with_flags(NatsAuth(ca_file=str(tls.ca))),
                           live=True, settings=Settings(connect_timeout=1.0, drain_timeout=2.0,
                                                        ack_timeout=2.0, backoff_max=0.3))
        for flow in (1, 2, 3):
            req = b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % flow
            rec.write(chunk(flow, True, time.time(), req), req)
            rec.flow_end(FlowEnd(flow, "fin"))
        rec.close()
        assert rec.stats()["records"] == 6
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
        report = tmp_path / "report.json"
        with http_server() as target:
            assert main(["--log-level", "warning", "replay", url, "--target", target,
                         "--speed", "max", "--report-json", str(report),
                         "--source-ports", "any"]) == 0
    finally:
        server.stop()
    rep = json.loads(report.read_text())
    assert rep["target"]["status"] == {"200": 3}
