"""Capture files that change underneath, and captures that are streams (issue 19, finding 3
and part of 7): a file truncated, grown or replaced while it is read is read safely (no
SIGBUS: nothing is mapped), cut short with its name and byte offset, and the process lives;
``-`` is standard input; pipes, FIFOs and process substitution are read, each once."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import structlog.testing

from agent.model import ACK, PSH, SYN, Segment
from agent.sources import SourceError
from agent.sources.files.capfile import CutShort, frames
from agent.sources.files.capstream import CHUNK, Capture
from agent.sources.files.pcapfile import PcapFileSource, read_frames
from agent.sources.filter import synthesize_frame
from tests.unit.test_cli_input import (
    AGENT,
    DEMO,
    SOURCE_FILES_CUT_SHORT,
    SOURCE_FRAMES,
    pcap_records,
    to_pcapng,
    warnings_of,
)

SERVER = bytes([198, 51, 100, 1])


def big_capture(path: Path, flows: int = 40, per_flow: int = 400, payload: int = 300,
                seed: int = 5) -> int:
    """A pcap of ``flows`` connections (handshake, then ``per_flow`` data segments each,
    interleaved) several read chunks long; returns its frame count."""
    rng = random.Random(seed)
    frames = []
    for i in range(flows):
        client = bytes([192, 0, 2, 1 + i])
        frames += [synthesize_frame(client, SERVER, 20000 + i, 8080, b"", 0, 0, SYN),
                   synthesize_frame(SERVER, client, 8080, 20000 + i, b"", 0, 1, SYN | ACK),
                   synthesize_frame(client, SERVER, 20000 + i, 8080, b"", 1, 1, ACK)]
    sent = [0] * flows
    for _ in range(flows * per_flow):
        i = rng.randrange(flows)
        frames.append(synthesize_frame(bytes([192, 0, 2, 1 + i]), SERVER, 20000 + i, 8080,
                                       rng.randbytes(rng.randint(1, payload)), 1 + sent[i], 1,
                                       ACK | PSH))
        sent[i] += len(frames[-1]) - 54
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    out += [struct.pack("<IIII", 1_700_000_000, n, len(f), len(f)) + f
            for n, f in enumerate(frames)]
    path.write_bytes(b"".join(out))
    assert path.stat().st_size > 3 * CHUNK
    return len(frames)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("big") / "big.pcap"
    return path, big_capture(path)


def _fields(segments: list[Segment]) -> list[tuple[object, ...]]:
    return [(s.src_ip, s.src_port, s.seq, s.flags, s.payload, s.ts) for s in segments]


def _segments(src: PcapFileSource) -> list[Segment]:
    return [s for b in src.batches() for s in b]


# ------------------------------------------------------------------ truncated while read


@pytest.mark.parametrize("kind", ["pcap", "pcap, filtered", "pcapng"])
def test_a_file_truncated_while_read_is_cut_short_not_a_crash(
        tmp_path: Path, big: tuple[Path, int], kind: str) -> None:
    """copytruncate: the file is emptied after its first chunk was read. Mapped, the next
    read was a SIGBUS; read in chunks, it is an end the reader reports."""
    path = tmp_path / "live.pcap"
    if kind == "pcapng":
        path.write_bytes(to_pcapng(big[0].read_bytes())[0])
    else:
        shutil.copy(big[0], path)
    size = path.stat().st_size
    src = PcapFileSource([path], (lambda lt, f: True) if "filtered" in kind else None)
    batches = src.batches()
    got = len(next(batches))
    os.truncate(path, 100)
    got += sum(len(b) for b in batches)
    stats = src.stats()
    assert 0 < got == stats["frames"] < big[1] and stats["cut_short_files"] == 1
    assert size > CHUNK


def test_the_cut_short_warning_names_the_file_and_where(
        tmp_path: Path, big: tuple[Path, int]) -> None:
    path = tmp_path / "live.pcap"
    shutil.copy(big[0], path)
    raw = path.read_bytes()
    src = PcapFileSource([path])
    batches = src.batches()
    next(batches)
    os.truncate(path, 0)
    with structlog.testing.capture_logs() as logs:
        list(batches)
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    frames_read = src.stats()["frames"]
    offset = pcap_records(raw)[frames_read][0]  # the first record not read
    assert "capture file cut short" in warning["event"]
    assert (warning["file"], warning["frame"], warning["offset"]) == (
        str(path), frames_read + 1, offset)
    assert f"had {len(raw)} bytes when opened" in warning["reason"]


def test_a_file_cut_at_a_record_boundary_while_read_is_still_cut_short(tmp_path: Path) -> None:
    """Shrinking to a whole record still loses the rest: the size it had when opened says
    so."""
    path = tmp_path / "f.pcap"
    raw = DEMO.read_bytes()
    path.write_bytes(raw)
    with Capture.open(path) as cap:
        os.truncate(path, pcap_records(raw)[100][0])
        with pytest.raises(CutShort, match="shrank while being read") as cut:
            list(frames(cap))
    assert (cut.value.frame, cut.value.offset) == (101, pcap_records(raw)[100][0])


def test_a_file_that_grows_while_read_is_read_to_where_it_ends(
        tmp_path: Path, big: tuple[Path, int]) -> None:
    path = tmp_path / "growing.pcap"
    shutil.copy(big[0], path)
    extra = DEMO.read_bytes()[24:]
    src = PcapFileSource([path])
    batches = src.batches()
    got = len(next(batches))
    with path.open("ab") as f:
        f.write(extra)
    got += sum(len(b) for b in batches)
    assert src.stats()["frames"] == big[1] + len(pcap_records(DEMO.read_bytes()))
    assert src.stats()["cut_short_files"] == 0 and got > big[1]


def test_a_file_replaced_after_the_check_is_read_as_it_is_then(tmp_path: Path) -> None:
    """Renamed over (log rotation): the name is opened when its turn comes; a FIFO put in
    its place is not waited on but cut short."""
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    raw = DEMO.read_bytes()
    a.write_bytes(raw[: pcap_records(raw)[50][0]])
    b.write_bytes(raw)
    src = PcapFileSource([a, b])
    os.replace(b, a)  # a is now the whole capture
    os.mkfifo(b)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(_count(src)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "the reader waits on a FIFO"
    assert src.stats()["frames"] == len(pcap_records(raw)) == got[0]
    assert src.stats()["cut_short_files"] == 1


def _count(src: PcapFileSource) -> int:
    return sum(len(b) for b in src.batches())


# ------------------------------------------------------------------ chunk boundaries, pipes


def _pipe_capture(raw: bytes, rng: random.Random, name: str = "pipe") -> Capture:
    """A capture read from a pipe a thread writes ``raw`` into in small, random pieces."""
    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb", buffering=0) as out:
            pos = 0
            while pos < len(raw):
                n = rng.choice([1, 3, 16, 17, 100, 4096, 70_000])
                out.write(raw[pos : pos + n])
                pos += n

    threading.Thread(target=write, daemon=True).start()
    return Capture.from_fd(r, Path(name))


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_pipe_fed_in_small_pieces_reads_like_the_file(
        tmp_path: Path, big: tuple[Path, int], kind: str) -> None:
    path = tmp_path / f"f.{kind}"
    raw = big[0].read_bytes() if kind == "pcap" else to_pcapng(big[0].read_bytes())[0]
    path.write_bytes(raw)
    want = _fields(_segments(PcapFileSource([path])))
    got = _fields(_segments(PcapFileSource([_pipe_capture(raw, random.Random(3))])))
    assert got == want and len(want) == big[1]
    # The generic reader (a filter) splits records across reads alike.
    every = list(read_frames(path))
    src = PcapFileSource([_pipe_capture(raw, random.Random(4))], lambda lt, f: True)
    assert _fields(_segments(src)) == want and src.stats()["frames"] == len(every)


def test_a_truncated_stream_is_cut_short_where_it_ends(big: tuple[Path, int]) -> None:
    raw = big[0].read_bytes()
    records = pcap_records(raw)
    cut = records[-10][0] + 20  # inside a record
    src = PcapFileSource([_pipe_capture(raw[:cut], random.Random(1))])
    _segments(src)
    assert src.stats()["frames"] == len(records) - 10 and src.stats()["cut_short_files"] == 1


def test_standard_input_is_given_once_at_most() -> None:
    with pytest.raises(SourceError, match="more than once"):
        PcapFileSource([Path("-"), DEMO, Path("-")])


# ------------------------------------------------------------------ the command line


def _offline(*args: str, stdin: bytes | None = None,
             shell: str | None = None) -> tuple[int, str, dict[str, int]]:
    cmd = [*AGENT, "offline", *args, "--port", "8080", "--stats-json", "-"]
    if shell is not None:
        res = subprocess.run(["bash", "-c", shell + " " + " ".join(cmd)], capture_output=True,
                             timeout=60)
    else:
        res = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)
    out, err = res.stdout.decode(), res.stderr.decode()
    assert "Traceback" not in err
    return res.returncode, err, json.loads(out) if out.strip() else {}


def test_offline_reads_standard_input() -> None:
    raw = DEMO.read_bytes()
    status, _err, stats = _offline("-", stdin=raw)
    assert status == 0 and stats[SOURCE_FRAMES] == len(pcap_records(raw))
    status, err, stats = _offline("-", stdin=raw[:-5])
    assert status == 3 and stats[SOURCE_FILES_CUT_SHORT] == 1
    (warning,) = warnings_of(err)
    assert warning["file"] == "standard input" and warning["offset"] == pcap_records(raw)[-1][0]


def test_offline_reads_standard_input_redirected_from_a_file() -> None:
    """A file on fd 0 is read once too: a duplicate of fd 0 shares its offset, so it is not
    opened again after the check."""
    with DEMO.open("rb") as f:
        res = subprocess.run([*AGENT, "offline", "-", "--port", "8080", "--stats-json", "-"],
                             stdin=f, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[SOURCE_FRAMES] == len(pcap_records(DEMO.read_bytes()))


def test_offline_reads_pcapng_from_a_pipe_and_process_substitution() -> None:
    n = len(pcap_records(DEMO.read_bytes()))
    ng = to_pcapng(DEMO.read_bytes())[0]
    status, _err, stats = _offline("-", stdin=ng)
    assert status == 0 and stats[SOURCE_FRAMES] == n
    status, _err, stats = _offline(f"<(cat {DEMO})", str(DEMO), shell="exec")
    assert status == 0 and stats[SOURCE_FRAMES] == 2 * n


def test_offline_reads_a_fifo_once(tmp_path: Path) -> None:
    """The up-front header check and the reading share one open: nothing read twice,
    nothing lost."""
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    raw = DEMO.read_bytes()

    def feed() -> None:
        with fifo.open("wb") as f:
            f.write(raw)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    status, _err, stats = _offline(str(fifo), str(DEMO))
    writer.join(5)
    assert status == 0 and stats[SOURCE_FRAMES] == 2 * len(pcap_records(raw))


def test_offline_given_standard_input_twice_is_a_usage_error() -> None:
    res = subprocess.run([*AGENT, "offline", "-", "-", "--port", "8080"], input="",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "more than once" in res.stderr


def _capture_fd_pos(pid: int, path: Path) -> int | None:
    """Where process ``pid`` reads ``path`` (its descriptor's offset), None if not open."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
        except OSError:
            continue
    return None


def test_offline_lives_through_its_file_truncated_mid_read(
        tmp_path: Path, big: tuple[Path, int]) -> None:
    """The reproduction of finding 3: the run stalls on a full stdout pipe part-way through
    the file, the file is truncated (copytruncate), the run goes on. Before: SIGBUS, exit
    135 (-7 here), no summary. Now: cut short with the file and offset, exit 3."""
    path = tmp_path / "rotating.pcap"
    shutil.copy(big[0], path)
    size = path.stat().st_size
    with subprocess.Popen([*AGENT, "offline", str(path), "--port", "8080", "--record", "-",
                           "--both-directions"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            assert proc.stdout.read(1)  # writing: it stalls once the pipe is full
            last, still = -1, 0
            while still < 5:  # the reader's offset stops moving: stalled
                time.sleep(0.1)
                pos = _capture_fd_pos(proc.pid, path)
                still = still + 1 if pos == last else 0
                last = pos if pos is not None else -1
            assert last < size, "the run read the whole file before stalling"
            os.truncate(path, 4096)
            proc.stdout.read()
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
            status = proc.wait(30)
    assert status == 3, (status, err[-2000:])
    (warning,) = warnings_of(err)
    assert warning["file"] == str(path) and isinstance(warning["offset"], int)
    assert "shrank while being read" in str(warning["reason"])
    assert "mirror-agent summary:" in err and "files_cut_short=1" in err
