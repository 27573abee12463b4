"""Reading sources into connections (agent.replay.sources, agent.replay.assemble): bursts,
keys, damaged files reported with their position, the rest kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.replay import load
from agent.replay.assemble import assemble
from agent.replay.sources import SourceError, open_sources
from agent.sinks.record import RecordedChunk
from tests.unit.replay_util import chunk, http_items, write_jsonl, write_native

REQ = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def rec(flow: int, to_service: bool, at: float, data: bytes, gap: int = 0,
        port: int = 80) -> RecordedChunk:
    c = chunk(flow, to_service, at, data, gap, port)
    return RecordedChunk("chunk", flow, c.direction, at, gap, c.from_addr, c.to_addr, data)


def test_bursts_say_whether_an_answer_came_before_them() -> None:
    conns, unusable = assemble([
        rec(1, True, 1.0, REQ), rec(1, True, 1.1, REQ),  # pipelined: no answer between
        rec(1, False, 1.2, OK + OK),
        rec(1, True, 1.3, REQ), rec(1, False, 1.4, OK),
    ])
    [c] = conns
    assert unusable == 0
    assert [(b.data, len(b.requests), b.after_answer) for b in c.bursts] == [
        (REQ, 1, False), (REQ, 1, False), (REQ, 1, True)]
    assert [r.status for r in c.backlog] == [200] * 3  # production's, until it replays
    assert c.feeder.answers_seen


def test_without_answers_no_burst_comes_after_one() -> None:
    conns, _ = assemble([rec(1, True, 1.0, REQ), rec(1, True, 2.0, REQ)])
    assert [len(b.requests) for b in conns[0].bursts] == [1, 1]
    assert not conns[0].backlog and not conns[0].feeder.answers_seen


def test_a_request_split_over_chunks_completes_in_its_last() -> None:
    post = b"POST /p HTTP/1.1\r\nContent-Length: 6\r\n\r\nabcdef"
    conns, _ = assemble([rec(1, True, 1.0, post[:10]), rec(1, True, 1.1, post[10:-2]),
                         rec(1, True, 1.2, post[-2:] + REQ)])
    assert [[r.path for r in b.requests] for b in conns[0].bursts] == [[], [], ["/p", "/"]]
    assert [r.end for b in conns[0].bursts for r in b.requests] == [len(post),
                                                                  len(post) + len(REQ)]


def test_keys_addresses_and_flow_ends() -> None:
    end = RecordedChunk("end", 1, rec(1, True, 0, b"").direction, 0.0, 0, "", "", b"fin")
    conns, _ = assemble([
        rec(1, True, 3.0, REQ), end,
        rec(1, True, 1.0, REQ),  # the same id after its end: another connection
        rec(1, True, 2.0, REQ, port=81),  # the same id, other addresses: another one
    ])
    assert [c.start for c in conns] == [3.0, 1.0, 2.0]  # in the order read


def test_a_client_gap_cuts_the_connection() -> None:
    conns, _ = assemble([rec(1, True, 1.0, REQ), rec(1, True, 2.0, REQ, gap=10),
                         rec(1, True, 3.0, REQ)])
    assert conns[0].cut and len(conns[0].bursts) == 1


def test_native_and_jsonl_read_alike(tmp_path: Path) -> None:
    items = http_items(3, 4)
    write_native(tmp_path / "a.bin", items)
    write_jsonl(tmp_path / "a.jsonl", items)
    for name in ("a.bin", "a.jsonl"):
        conns, src = load(open_sources([tmp_path / name], []))
        assert (src.connections, src.requests, src.problems) == (3, 12, [])
        assert all(len(c.backlog) == 4 for c in conns)


def test_rotated_files_join_up(tmp_path: Path) -> None:
    items = http_items(2, 4)
    write_native(tmp_path / "r.bin", items[:5])
    write_native(tmp_path / "r.1.bin", items[5:])
    _conns, src = load(open_sources([tmp_path / "r.bin", tmp_path / "r.1.bin"], []))
    assert (src.connections, src.requests) == (2, 8)


def test_damaged_native_reports_offset_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "d.bin"
    write_native(path, http_items(2, 3))
    data = bytearray(path.read_bytes())
    data[16 + 8 + 40] ^= 0xFF  # inside the first record's body: its CRC fails
    path.write_bytes(bytes(data[:-5]))  # and the last record is cut short
    _conns, src = load(open_sources([path], []))
    assert src.requests == 5  # the first request is lost; the last response was cut
    assert any("corrupt record(s) skipped (CRC mismatch) at byte offset(s) 16" in p
               for p in src.problems)
    assert any("truncated" in p for p in src.problems)


def test_bad_jsonl_line_names_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    write_jsonl(path, http_items(1, 2, answered=False))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"flow": 1, "data": "!!"}\n' + lines[1][:20])
    _conns, src = load(open_sources([path], []))
    assert src.requests == 1
    assert src.problems[0].startswith(f"{path}: line 2 (byte offset {len(lines[0])}) skipped")
    assert "truncated last line" in src.problems[1]


def test_unreadable_or_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        open_sources([tmp_path / "missing.bin"], [])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SourceError, match="not a recording"):
        open_sources([tmp_path / "x.txt"], [])
    (tmp_path / "c.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(20))
    with pytest.raises(SourceError, match="--port"):
        open_sources([tmp_path / "c.pcap"], [])


def test_a_rotated_set_replays_in_the_order_it_was_written() -> None:
    """A shell glob gives rec.1, rec.10, rec.2, rec: the set is replayed rec, rec.1, rec.2,
    rec.10; other files keep their place."""
    from agent.replay.sources import rotation_order

    given = [Path(n) for n in ("rec.1.bin", "rec.10.bin", "rec.2.bin", "rec.bin",
                               "other.pcap", "rec.12.bin.gz", "rec.bin.gz")]
    assert [p.name for p in rotation_order(given)] == [
        "rec.bin", "rec.1.bin", "rec.2.bin", "rec.10.bin", "other.pcap", "rec.bin.gz",
        "rec.12.bin.gz"]
