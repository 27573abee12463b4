"""Capture files whose packets carry timestamps no classic pcap can hold (after 2106-02-07,
``2**63`` ns, year 586,524) or no date can name (after year 9999): ``offline`` reads them to
the end with or without ``--flow-pcap-dir`` and ``--record``, and the per-flow pcap files
get the timestamps clamped to the last one a pcap holds, counted (issue 19)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from agent.cli.commands import main
from agent.sinks.flow_pcap import PCAP_TIME_MAX, flow_name, pcap_time
from tests.unit.flow_pcap_util import read_pcap
from tests.unit.test_cli_input import pcap_records

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
RAW = DEMO.read_bytes()
CLAMPED = "mirror_agent_flowpcap_packets_clamped_total"
#: The last second a classic pcap's unsigned 32-bit seconds hold, as a file name's time.
LAST = "21060207T062815"


def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def pcapng(ticks: int, tsresol: int | None = None) -> bytes:
    """demo.pcap's frames as pcapng, the i-th frame at ``ticks + i`` (of ``tsresol``: the
    if_tsresol byte; None: microseconds)."""
    out = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = b"" if tsresol is None else struct.pack("<HHB3xHH", 9, 1, tsresol, 0, 0)
    out += _block(1, struct.pack("<HHI", struct.unpack_from("<I", RAW, 20)[0], 0, 0) + opts)
    for i, (pos, incl) in enumerate(pcap_records(RAW)):
        t = min(ticks + i, 2**64 - 1)
        out += _block(6, struct.pack("<IIIII", 0, t >> 32, t & 0xFFFFFFFF, incl, incl)
                      + RAW[pos + 16 : pos + 16 + incl])
    return out


def pcap(sec: int, usec: int) -> bytes:
    """demo.pcap with every record at ``sec`` seconds and ``usec`` (unchecked) microseconds."""
    out = bytearray(RAW)
    for pos, _ in pcap_records(RAW):
        struct.pack_into("<II", out, pos, sec, usec)
    return bytes(out)


YEAR_3000 = 32_503_680_000
#: name: (file kind, its bytes, whether every saved time is clamped)
CAPTURES = {
    "pcapng-year-3000": ("pcapng", pcapng(YEAR_3000 * 1_000_000), True),
    "pcapng-2**63-ns": ("pcapng", pcapng(2**63, tsresol=9), True),
    "pcapng-2**64-us": ("pcapng", pcapng(2**64 - 100), True),  # year 586,524: no date
    "pcapng-2**64-s": ("pcapng", pcapng(2**64 - 100, tsresol=0), True),  # past time_t
    "pcap-last-usec": ("pcap", pcap(0xFFFFFFFF, 999_999), False),  # the last one that fits
    "pcap-bad-usec": ("pcap", pcap(0xFFFFFFFF, 0xFFFFFFFF), True),  # 4,294 s of usec
}
#: Times so large (~1.8e19 s) that a float cannot add the idle timeout (600 s) to them:
#: the reassembler finds every flow idle at once. Absurd input, handled without a crash;
#: only the exit status and the files are checked.
IMPRECISE = "pcapng-2**64-s"
OUTPUTS = {
    "none": [],
    "flow-pcap": ["--flow-pcap-dir", "{dir}"],
    "flow-pcap-gzip": ["--flow-pcap-dir", "{dir}", "--flow-pcap-gzip"],
    "record-native": ["--record", "{dir}/rec.bin"],
    "record-jsonl": ["--record", "{dir}/rec.jsonl", "--record-format", "jsonl"],
    "record-pcapng": ["--record", "{dir}/rec.pcapng", "--record-format", "pcapng"],
}


def _offline(tmp_path: Path, capture: str, output: str) -> tuple[int, dict[str, float], Path]:
    kind, data, _ = CAPTURES[capture]
    src = tmp_path / f"in.{kind}"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    stats = tmp_path / "stats.json"
    args = [a.replace("{dir}", str(out)) for a in OUTPUTS[output]]
    rc = main(["--log-format", "json", "offline", str(src), "--port", "8080",
               "--stats-json", str(stats), *args])
    return rc, json.loads(stats.read_text()), out


def _cases() -> list[Any]:
    return [pytest.param(c, o, id=f"{c}-{o}") for c in CAPTURES for o in OUTPUTS]


@pytest.mark.parametrize(("capture", "output"), _cases())
def test_far_future_timestamps_are_read_to_the_end(tmp_path: Path, capture: str,
                                                   output: str) -> None:
    rc, stats, out = _offline(tmp_path, capture, output)
    assert rc == 0
    if capture != IMPRECISE:
        assert stats["mirror_agent_reassembly_flows_closed_total{reason=\"fin\"}"] == 7
    if not output.startswith("flow-pcap"):
        return
    files = sorted(out.iterdir())
    assert len(files) == stats["mirror_agent_flowpcap_files_completed_total"] > 0
    assert all(f.name.startswith(LAST) for f in files), files
    packets = [rec for f in files for rec in read_pcap(f)[2]]
    assert stats["mirror_agent_flowpcap_packets_total"] == len(packets)
    assert stats[CLAMPED] == (len(packets) if CAPTURES[capture][2] else 0)


def test_every_saved_time_is_one_a_pcap_holds() -> None:
    last = (0xFFFFFFFF, 999_999)
    assert PCAP_TIME_MAX == 0xFFFFFFFF + 0.999999
    cases = {1.5: ((1, 500_000), False), 0.0: ((0, 0), False), -1.0: ((0, 0), True),
             4294967295.0: ((0xFFFFFFFF, 0), False), 4294967296.0: (last, True),
             1e300: (last, True), float("inf"): (last, True), float("-inf"): ((0, 0), True),
             float("nan"): ((0, 0), True)}
    for ts, want in cases.items():
        assert pcap_time(ts) == want, ts
    v4 = (bytes([192, 0, 2, 1]), 40000), (bytes([192, 0, 2, 2]), 8080)
    for ts in (2.0**63, 1e19, float("inf"), float("nan"), -1e12):
        name = flow_name(ts, *v4)
        assert name.endswith("_192.0.2.1_40000_192.0.2.2_8080.pcap")
        assert name[:15] in (LAST, "19700101T000000"), name
