"""``--record-format pcapng`` (tshark follows it to the recorded bytes, rotated or not), and
the recording flags through the command line, the environment and the config file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.cli.layers import parse_options
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import make_writer
from tests.integration.truth import Streams, assert_same_streams, jsonl_streams, tshark_streams

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
RECORD_RECORDS = "mirror_agent_record_records_total"
RECORD_FILES_ROTATED = "mirror_agent_record_files_rotated_total"

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")


def offline(tmp: Path, out: Path, *extra: str) -> dict[str, int]:
    """``offline demo.pcap`` recording both directions to ``out``; its stats."""
    stats = tmp / f"{out.name}.stats.json"
    res = subprocess.run([*AGENT, "offline", str(DEMO), "--port", "8080", "--both-directions",
                          "--record", str(out), "--stats-json", str(stats), *extra],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(stats.read_text())  # type: ignore[no-any-return]


def rotated(tmp: Path, stem: str) -> list[Path]:
    """The files of a rotated recording ``stem...`` in the order written."""
    def n(p: Path) -> int:
        part = p.name.split(".")[1]
        return int(part) if part.isdigit() else 0
    return sorted((p for p in tmp.iterdir() if p.name.startswith(stem + ".")
                   and "stats" not in p.name), key=n)


@needs_tshark
def test_tshark_follows_pcapng_to_the_recorded_bytes(tmp_path: Path) -> None:
    offline(tmp_path, tmp_path / "rec.jsonl", "--record-format", "jsonl")
    offline(tmp_path, tmp_path / "rec.pcapng", "--record-format", "pcapng")
    recorded, gaps = jsonl_streams(tmp_path / "rec.jsonl")
    assert gaps == 0 and recorded
    ours = tshark_streams(tmp_path / "rec.pcapng", 8080)
    assert_same_streams(ours, recorded)
    assert_same_streams(ours, tshark_streams(DEMO, 8080))  # and so the capture's own bytes


@needs_tshark
@pytest.mark.parametrize("compress", [None, "gzip"])
def test_rotated_pcapng_files_each_follow_alone(tmp_path: Path, compress: str | None) -> None:
    """Every file is a capture of its own (a handshake for each connection it continues);
    the files' streams, joined in order, are the recording's."""
    extra = ["--record-compress", compress] if compress else []
    stats = offline(tmp_path, tmp_path / "rec.pcapng", "--record-format", "pcapng",
                    "--record-rotate", "8KiB", *extra)
    offline(tmp_path, tmp_path / "all.jsonl", "--record-format", "jsonl")
    files = rotated(tmp_path, "rec")
    assert len(files) == stats[RECORD_FILES_ROTATED] + 1 > 3
    joined: dict[tuple[str, str], bytes] = defaultdict(bytes)
    for f in files:
        for key, data in tshark_streams(f, 8080).items():
            joined[key] += data
    assert_same_streams(dict(joined), jsonl_streams(tmp_path / "all.jsonl")[0])


def synthetic(path: Path) -> None:
    """Two connections (IPv4 and IPv6), a gap, an RST, an address that is not an IP."""
    with path.open("wb") as f:
        w = make_writer(f, "pcapng")
        c4, s4 = "192.0.2.1:40000", "198.51.100.2:80"
        w.write(TrafficChunk(b"", c4, s4, Direction.TO_OBSERVED, 1.0, 1), b"A" * 3000)
        w.write(TrafficChunk(b"", s4, c4, Direction.FROM_OBSERVED, 1.5, 1), b"B" * 10)
        w.write(TrafficChunk(b"", c4, s4, Direction.TO_OBSERVED, 2.0, 1, gap_bytes=500),
                b"C" * 7)
        w.flow_end(FlowEnd(1, "fin", 0))
        c6, s6 = "[2001:db8::1]:5555", "[2001:db8::2]:443"
        w.write(TrafficChunk(b"", s6, c6, Direction.FROM_OBSERVED, 3.0, 2), b"D" * 1441)
        w.flow_end(FlowEnd(2, "rst", 0))
        w.write(TrafficChunk(b"", "not-an-ip:1", "192.0.2.9:80", Direction.TO_OBSERVED, 4.0,
                             3), b"E" * 5)
        w.flush()


def tshark_fields(path: Path, *fields: str, prefs: tuple[str, ...] = ()) -> list[list[str]]:
    args = ["tshark", "-r", str(path), *prefs, "-T", "fields", "-E", "separator=|"]
    for field in fields:
        args += ["-e", field]
    res = subprocess.run(args, capture_output=True, text=True, check=True)
    return [line.split("|") for line in res.stdout.splitlines()]


@needs_tshark
def test_synthesised_packets_are_valid_and_say_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "s.pcapng"
    synthetic(path)
    checks = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
    rows = tshark_fields(path, "tcp.flags.str", "tcp.len", "tcp.checksum.status",
                         "ip.checksum.status", "frame.comment", prefs=checks)
    assert all(r[2] == "1" for r in rows), "every TCP checksum is good"
    assert all(r[3] in ("1", "") for r in rows), "every IPv4 header checksum is good"
    lens = [int(r[1]) for r in rows if r[1] not in ("", "0")]
    assert lens == [1460, 1460, 80, 10, 7, 1440, 1, 5]  # MSS-sized segments, IPv6 MSS 1440
    comments = [r[4] for r in rows if r[4]]
    assert any("500 bytes missing before this segment" in c for c in comments)
    assert any("connection ended (rst)" in c for c in comments)
    assert any("stand-in addresses for not-an-ip:1" in c for c in comments)
    syns = [r for r in rows if "S" in r[0]]
    assert len(syns) == 6  # SYN and SYN-ACK of each of the three connections
    streams: Streams = tshark_streams(path, 80)
    assert streams[("192.0.2.1:40000", "198.51.100.2:80")].startswith(b"A" * 3000)
    assert streams[("198.51.100.2:80", "192.0.2.1:40000")] == b"B" * 10


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("argv,needle", [
    (["--record", "-", "--record-rotate", "1h"], "--record - is stdout"),
    (["--record", "/dev/stdout", "--record-rotate", "1h"], "needs a file path"),
    (["--record", "x.bin", "--record-max-total", "1GiB"], "needs --record-rotate"),
    (["--record-rotate", "1h"], "--record-rotate needs --record"),
    (["--record", "x.bin", "--record-rotate", "100"], "has no unit"),
    (["--record", "x.bin", "--record-rotate", "1MiB", "--record-max-total", "512KiB"],
     "less than the --record-rotate size"),
    (["--record", "x.bin", "--record-compress", "lz4"], "invalid choice"),
])
def test_bad_recording_flags_exit_2_with_one_line(
        argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["offline", "--port", "8080", str(DEMO), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not list(tmp_path.iterdir())  # no file left behind


def test_a_fifo_is_not_rotated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["offline", "--port", "8080", str(DEMO), "--record", str(fifo),
                 "--record-rotate", "1h"]) == 2
    assert "is a FIFO or a device" in capsys.readouterr().err


def test_recording_flags_are_config_keys_and_variables(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('record = "r.bin"\nrecord-rotate = "256MiB,1h"\n'
                    'record-compress = "gzip"\nrecord-format = "pcapng"\n')
    env = {"MIRROR_AGENT_RECORD_MAX_TOTAL": "4GiB"}
    opts = parse_options(["offline", str(DEMO), "--port", "80", "--config", str(conf)], env)
    p = opts.pipe
    assert (p.record_rotate, p.record_max_total, p.record_compress, p.record_format) == (
        "256MiB,1h", 4 << 30, "gzip", "pcapng")
    policy = p.record_files
    assert policy is not None and policy.rotation is not None
    assert (policy.rotation.max_bytes, policy.rotation.seconds) == (256 << 20, 3600.0)
    assert opts.origins["record-max-total"] == "env MIRROR_AGENT_RECORD_MAX_TOTAL"
    assert opts.effective()["record-rotate"] == ("256MiB,1h", f"config {conf}")


def test_offline_rotation_with_gzip_reads_back_whole(tmp_path: Path) -> None:
    """Every file inspect reads alone, cleanly; together they hold every record counted."""
    stats = offline(tmp_path, tmp_path / "rec-%Y.bin", "--record-rotate", "4KiB",
                    "--record-compress", "gzip")
    files = [p for p in tmp_path.iterdir() if p.name.endswith(".bin.gz")]
    assert len(files) == stats[RECORD_FILES_ROTATED] + 1 > 3
    total = 0
    for f in files:
        res = subprocess.run([*AGENT, "inspect", "--format", "jsonl", str(f)],
                             capture_output=True, text=True)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        total += len(res.stdout.splitlines())
    assert total == stats[RECORD_RECORDS]
