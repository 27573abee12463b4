"""What ``replay`` reads (issue 19, finding 7): ``-`` and ``/dev/stdin``, pipes, FIFOs and
process substitution, each read once; recordings compressed with gzip or zstd (as
``--record-compress`` writes them), from files and from streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.cli.replay import load
from agent.replay.sources import SourceError, open_sources
from agent.sinks.record.codec import new_compressor
from tests.unit.replay_util import http_items, write_jsonl, write_native
from tests.unit.test_cli_input import DEMO
from tests.unit.test_replay_cli import http_server

AGENT = [sys.executable, "-m", "agent.cli", "--log-level", "warning", "replay"]
FLOWS, REQUESTS = 3, 4


def _compressed(raw: bytes, how: str) -> bytes:
    c = new_compressor(how)
    half = len(raw) // 2  # two flush points, as the recorder writes batches
    return c.compress(raw[:half]) + c.sync() + c.compress(raw[half:]) + c.finish()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recordings")
    items = http_items(FLOWS, REQUESTS)
    write_native(d / "r.bin", items)
    write_jsonl(d / "r.jsonl", items)
    out = {"native": d / "r.bin", "jsonl": d / "r.jsonl"}
    for base in ("native", "jsonl"):
        for how, suffix in (("gzip", ".gz"), ("zstd", ".zst")):
            path = out[base].with_name(out[base].name + suffix)
            path.write_bytes(_compressed(out[base].read_bytes(), how))
            out[f"{base}+{how}"] = path
    return out


@pytest.mark.parametrize("name", ["native+gzip", "native+zstd", "jsonl+gzip", "jsonl+zstd"])
def test_compressed_recordings_replay_like_plain_ones(recordings: dict[str, Path],
                                                      name: str) -> None:
    _conns, src = load(open_sources([recordings[name]], []))
    assert (src.connections, src.requests, src.problems) == (FLOWS, FLOWS * REQUESTS, [])


def test_a_compressed_recording_cut_short_says_so(recordings: dict[str, Path],
                                                  tmp_path: Path) -> None:
    cut = tmp_path / "cut.bin.gz"
    cut.write_bytes(recordings["native+gzip"].read_bytes()[:-12])
    _conns, src = load(open_sources([cut], []))
    assert src.requests > 0
    assert any("gzip stream is cut short" in p for p in src.problems), src.problems


def _replay(source: str, target: str, stdin: bytes | None = None, *extra: str,
            shell: bool = False) -> tuple[int, dict[str, Any]]:
    cmd = [*AGENT, source, "--target", target, "--speed", "max", "--report-json", "-",
           "--source-ports", "any", *extra]
    if shell:
        res = subprocess.run(["bash", "-c", " ".join(cmd)], capture_output=True, timeout=120)
    else:
        res = subprocess.run(cmd, input=stdin, capture_output=True, timeout=120)
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


@pytest.mark.parametrize("name", ["native", "jsonl", "native+gzip", "jsonl+zstd"])
@pytest.mark.parametrize("source", ["-", "/dev/stdin"])
def test_standard_input_replays(recordings: dict[str, Path], name: str, source: str) -> None:
    """Before: the format check read the start of the pipe and the reader opened it again:
    ``replay /dev/stdin`` replayed nothing and exited 0."""
    with http_server() as target:
        status, rep = _replay(source, target, recordings[name].read_bytes())
    assert status == 0, rep
    assert (rep["source"]["requests"], rep["target"]["requests_sent"]) == (FLOWS * REQUESTS,) * 2
    assert rep["source"]["files"] == ["standard input" if source == "-" else source]


def test_standard_input_redirected_from_a_file_replays(recordings: dict[str, Path]) -> None:
    with http_server() as target, recordings["native+gzip"].open("rb") as f:
        res = subprocess.run([*AGENT, "-", "--target", target, "--speed", "max",
                              "--report-json", "-", "--source-ports", "any"],
                             stdin=f, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["source"]["requests"] == FLOWS * REQUESTS


def test_process_substitution_and_a_fifo_replay(recordings: dict[str, Path],
                                                tmp_path: Path) -> None:
    fifo = tmp_path / "rec.fifo"
    os.mkfifo(fifo)
    data = recordings["native+zstd"].read_bytes()

    def feed() -> None:
        with fifo.open("wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with http_server() as target:
        status, rep = _replay(str(fifo), target)
        writer.join(5)
        assert status == 0 and rep["source"]["requests"] == FLOWS * REQUESTS
        status, rep = _replay(f"<(cat {recordings['jsonl+gzip']}) {recordings['native']}",
                              target, shell=True)
    assert status == 0 and rep["source"]["requests"] == 2 * FLOWS * REQUESTS


def test_a_capture_on_standard_input_replays_like_the_file() -> None:
    with http_server() as target:
        _s1, from_file = _replay(str(DEMO), target, None, "--port", "8080")
        _s2, from_stdin = _replay("-", target, DEMO.read_bytes(), "--port", "8080")
    keys = ("connections", "requests", "client_bytes", "problems")
    assert [from_stdin["source"][k] for k in keys] == [from_file["source"][k] for k in keys]
    assert from_file["source"]["requests"] > 0


def test_standard_input_once_and_compressed_captures_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="more than once"):
        open_sources([Path("-"), Path("-")], [])
    packed = tmp_path / "cap.pcap.gz"
    packed.write_bytes(_compressed(DEMO.read_bytes(), "gzip"))
    with pytest.raises(SourceError, match="compressed capture"):
        open_sources([packed], [8080])
