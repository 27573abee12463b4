"""Bad input gets a clear answer: usage errors exit 2 with one line, damaged captures and
recordings are read up to the damage and reported, a closed stdout ends the run quietly."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.sinks.record import NativeWriter
from agent.sources import SourceError
from agent.sources.files.pcapfile import PcapFileSource, read_frames
from tests.unit.test_record import chunk

# Metrics (agent/metrics.py) this file reads from stats.
SOURCE_BAD_FRAMES = "mirror_agent_source_bad_frames_total"
SOURCE_FILES_CUT_SHORT = "mirror_agent_source_files_cut_short_total"
SOURCE_FRAMES = "mirror_agent_source_frames_total"

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]


def pcap_records(raw: bytes) -> list[tuple[int, int]]:
    """(offset, captured length) of every record of a little-endian pcap file."""
    out, pos = [], 24
    while pos < len(raw):
        incl = struct.unpack_from("<I", raw, pos + 8)[0]
        out.append((pos, incl))
        pos += 16 + incl
    return out


def to_pcapng(raw: bytes) -> tuple[bytes, list[int]]:
    """The frames of a pcap file as pcapng (SHB, IDB, one EPB per frame); and the offset of
    every EPB."""
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", struct.unpack_from("<I", raw, 20)[0], 0, 0))
    offsets = []
    for pos, incl in pcap_records(raw):
        sec, usec = struct.unpack_from("<II", raw, pos)
        ts = sec * 1_000_000 + usec
        offsets.append(len(out))
        out += block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, incl, incl)
                     + raw[pos + 16 : pos + 16 + incl])
    return out, offsets


def run_offline(path: Path, tmp_path: Path) -> tuple[int, str, dict[str, int]]:
    stats = tmp_path / "stats.json"
    res = subprocess.run([*AGENT, "offline", str(path), "--port", "8080", "--stats-json",
                          str(stats), "--overwrite"], capture_output=True, text=True)
    assert "Traceback" not in res.stderr
    return res.returncode, res.stderr, json.loads(stats.read_text())


def warnings_of(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines()
            if line.startswith("{") and '"warning"' in line]


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("argv,needle", [
    (["run", "--iface", "", "--port", "80"], "--iface: no interface named"),
    (["run", "--iface", ",", "--port", "80"], "--iface: no interface named"),
    (["run", "--iface", " , ", "--port", "80"], "--iface: no interface named"),
    (["run", "--iface", "lo", "--port", ","], "--port: no port named"),
    (["offline", str(DEMO), "--port", ","], "--port: no port named"),
    (["offline", str(DEMO), "--port", ""], "--port: no port named"),
])
def test_nothing_named_is_a_usage_error(argv: list[str], needle: str) -> None:
    # A process with a timeout: as root, a `run` that got past its options would capture.
    res = subprocess.run([*AGENT, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


# ------------------------------------------------------------------ damaged captures


def test_absurd_caplen_mid_pcap_cuts_the_file_short(tmp_path: Path) -> None:
    raw = bytearray(DEMO.read_bytes())
    offset, _ = pcap_records(bytes(raw))[10]
    struct.pack_into("<I", raw, offset + 8, 0x7FFFFFFF)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(raw)
    status, err, stats = run_offline(bad, tmp_path)
    assert status == 3
    assert stats[SOURCE_FRAMES] == 10 and stats[SOURCE_FILES_CUT_SHORT] == 1
    (warning,) = warnings_of(err)
    assert (warning["file"], warning["frame"], warning["offset"]) == (str(bad), 11, offset)
    assert "cut short" in str(warning["event"])
    assert "files_cut_short=1" in err
    assert "mirror-agent: degraded: 1 capture file(s) cut short" in err


def test_truncated_last_pcap_record_cuts_the_file_short(tmp_path: Path) -> None:
    raw = DEMO.read_bytes()
    records = pcap_records(raw)
    bad = tmp_path / "cut.pcap"
    bad.write_bytes(raw[:-5])
    status, err, stats = run_offline(bad, tmp_path)
    assert status == 3 and stats[SOURCE_FRAMES] == len(records) - 1
    (warning,) = warnings_of(err)
    assert (warning["frame"], warning["offset"]) == (len(records), records[-1][0])


def test_a_whole_pcap_exits_0(tmp_path: Path) -> None:
    status, err, stats = run_offline(DEMO, tmp_path)
    assert status == 0 and stats[SOURCE_FILES_CUT_SHORT] == 0 and "degraded" not in err


@pytest.mark.parametrize("damage", ["huge length", "trailer mismatch"])
def test_bad_pcapng_block_length_cuts_the_file_short(tmp_path: Path, damage: str) -> None:
    ng, offsets = to_pcapng(DEMO.read_bytes())
    raw = bytearray(ng)
    pos = offsets[20]
    if damage == "huge length":
        struct.pack_into("<I", raw, pos + 4, 0xFFFFFFF0)
    else:  # a sane-looking length that is not this block's
        struct.pack_into("<I", raw, pos + 4, struct.unpack_from("<I", raw, pos + 4)[0] + 8)
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(raw)
    status, err, stats = run_offline(bad, tmp_path)
    assert status == 3 and stats[SOURCE_FRAMES] == 20
    (warning,) = warnings_of(err)
    assert (warning["frame"], warning["offset"]) == (21, pos)


def test_damaged_pcapng_packet_in_an_intact_block_is_skipped(tmp_path: Path) -> None:
    ng, offsets = to_pcapng(DEMO.read_bytes())
    raw = bytearray(ng)
    struct.pack_into("<I", raw, offsets[5] + 20, 100_000)  # captured length > its block
    struct.pack_into("<I", raw, offsets[7] + 8, 9)  # an interface that was never declared
    bad = tmp_path / "skip.pcapng"
    bad.write_bytes(raw)
    status, err, stats = run_offline(bad, tmp_path)
    assert status == 0
    assert stats[SOURCE_BAD_FRAMES] == 2
    assert stats[SOURCE_FRAMES] == len(offsets) - 2
    (warning,) = warnings_of(err)  # the first per file; the rest are counted
    assert (warning["frame"], warning["offset"]) == (6, offsets[5])


@pytest.mark.parametrize("kind,size", [("pcap", 12), ("pcap", 23), ("pcapng", 12),
                                       ("pcapng", 27)])
def test_a_truncated_global_header_is_refused_before_anything_runs(
        tmp_path: Path, kind: str, size: int) -> None:
    raw = DEMO.read_bytes() if kind == "pcap" else to_pcapng(DEMO.read_bytes())[0]
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(raw[:size])
    stats = tmp_path / "stats.json"
    # After a whole file: it must not be read first and then abandoned unflushed.
    res = subprocess.run([*AGENT, "offline", str(DEMO), str(cut), "--port", "8080",
                          "--stats-json", str(stats)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cut) in lines[0] and "truncated" in lines[0], lines
    assert not stats.exists()


def test_a_file_damaged_after_the_start_is_cut_short(tmp_path: Path) -> None:
    """Checked at start, cut by the time it is read: counted, the run goes on."""
    later = tmp_path / "later.pcap"
    later.write_bytes(DEMO.read_bytes())
    src = PcapFileSource([DEMO, later])
    later.write_bytes(DEMO.read_bytes()[:12])
    segments = sum(len(b) for b in src.batches())
    assert segments > 0 and src.stats()["cut_short_files"] == 1


def test_one_header_check_for_the_run_and_the_reader(tmp_path: Path) -> None:
    for raw in (b"\xd4\xc3\xb2\xa1" + b"\0" * 8, b"\x0a\x0d\x0d\x0a" + b"\0" * 8, b"nope"):
        path = tmp_path / "x.pcap"
        path.write_bytes(raw)
        with pytest.raises(SourceError) as at_start:
            PcapFileSource([path])
        with pytest.raises(SourceError) as reading:
            list(read_frames(path))
        assert str(at_start.value) == str(reading.value)


def test_random_damage_never_crashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(7)
    clean = DEMO.read_bytes()
    ng, _ = to_pcapng(clean)
    for i in range(60):
        raw = bytearray(clean if i % 2 else ng)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(24, len(raw) - 4)
            struct.pack_into("<I", raw, pos, rng.getrandbits(32))
        path = tmp_path / f"f{i}.pcap"
        path.write_bytes(raw)
        assert main(["offline", str(path), "--port", "8080"]) in (0, 2, 3)
        err = capsys.readouterr().err
        assert "failed" not in err and "Traceback" not in err


# ------------------------------------------------------------------ damaged recordings


def recording(tmp_path: Path, n: int = 6) -> tuple[Path, list[int]]:
    """A native recording of ``n`` chunks; and the byte offset of each record."""
    path = tmp_path / "rec.bin"
    with path.open("wb") as f:
        w = NativeWriter(f)
        for i in range(1, n + 1):
            w.write(chunk(i), chunk(i).data)
        w.flush()
    raw, offsets, pos = path.read_bytes(), [], 16
    while pos < len(raw):
        offsets.append(pos)
        pos += 8 + struct.unpack_from("<I", raw, pos)[0]
    return path, offsets


def inspect(path: Path) -> tuple[int, list[str], list[str]]:
    """Exit status, the chunk lines printed and the stderr lines of ``inspect PATH``."""
    res = subprocess.run([*AGENT, "inspect", str(path)], capture_output=True, text=True)
    assert "Traceback" not in res.stderr
    return (res.returncode, [ln for ln in res.stdout.splitlines() if ln.startswith("flow")],
            res.stderr.splitlines())


def test_inspect_skips_a_corrupt_record_mid_file(tmp_path: Path) -> None:
    path, offsets = recording(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offsets[2] + 8 + 40] ^= 0xFF  # a byte of the third record's body: its CRC fails
    path.write_bytes(raw)
    status, lines, err = inspect(path)
    assert status == 3  # read, but damaged
    assert [ln.split()[1] for ln in lines] == ["1", "2", "4", "5", "6"]
    assert len(err) == 1
    assert f"1 corrupt record(s) skipped (CRC mismatch) at byte offset(s) {offsets[2]}" in err[0]


def test_inspect_stops_where_no_whole_record_follows(tmp_path: Path) -> None:
    path, offsets = recording(tmp_path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, offsets[3], 0x7FFF0000)  # the fourth record's length
    path.write_bytes(raw)
    status, lines, err = inspect(path)
    assert status == 3 and len(lines) == 3
    assert len(err) == 1 and f"record at byte offset {offsets[3]}" in err[0]
    assert f"the last {len(raw) - offsets[3]} bytes are ignored" in err[0]


def test_inspect_decodes_bad_utf8_addresses_with_replacement(tmp_path: Path) -> None:
    path = tmp_path / "utf.bin"
    with path.open("wb") as f:
        w = NativeWriter(f)
        w.write(chunk(1), b"hello")
        w.flush()
    raw = bytearray(path.read_bytes())
    body = 16 + 8
    raw[body + 32] = 0xFF  # the first byte of the from address: not UTF-8
    struct.pack_into("<I", raw, 20, zlib.crc32(bytes(raw[body:])))
    path.write_bytes(raw)
    status, lines, err = inspect(path)
    assert status == 3 and len(lines) == 1 and "\ufffd" in lines[0]
    assert len(err) == 1 and "1 record(s) with addresses that are not UTF-8" in err[0]


def test_inspect_a_clean_recording_exits_0(tmp_path: Path) -> None:
    path, _ = recording(tmp_path)
    status, lines, err = inspect(path)
    assert (status, len(lines), err) == (0, 6, [])


# ------------------------------------------------------------------ a closed stdout


def assert_quiet(stderr: str) -> None:
    for noise in ("Traceback", "Exception ignored", "BrokenPipe", "mirror-agent: failed",
                  "mirror-agent: error"):
        assert noise not in stderr, stderr


def test_record_to_a_closed_stdout_exits_quietly() -> None:
    with subprocess.Popen([*AGENT, "offline", str(DEMO), "--port", "8080", "--record", "-"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first byte
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 141
    assert_quiet(err)


@pytest.mark.parametrize("command", [
    "offline {demo} --port 8080 --both-directions --record-format jsonl --record -",
    "inspect {rec}",
])
def test_head_of_the_output_exits_quietly(tmp_path: Path, command: str) -> None:
    rec, _ = recording(tmp_path, 250)  # more than a pipe holds
    agent = " ".join(AGENT) + " " + command.format(demo=DEMO, rec=rec)
    res = subprocess.run(["bash", "-c", f"{agent} | head -c 100 >/dev/null; "
                          "echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True)
    assert res.stderr.splitlines()[-1] == "141"
    assert_quiet(res.stderr)
