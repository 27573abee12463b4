"""NATS recording without a broker: the URL, the stream's name, a record as a message and
back, gaps owed by dropped records, and the metrics the recorder reports."""

from __future__ import annotations

from typing import Any

import pytest

from agent import metrics
from agent.cli.options import OptionError, PipelineOptions
from agent.cli.outputs import OutputError, RunOutputs
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.nats import NatsRecorder, NatsTarget, parse_nats_url, stream_name
from agent.sinks.nats.gaps import GapLedger
from agent.sinks.nats.message import BadMessage, decode, encode_chunk, encode_end, piece_size
from agent.sinks.record import RecordPolicy


def _chunk(data: bytes = b"GET / HTTP/1.1\r\n\r\n", flow: int = 7, gap: int = 0,
           src: str = "192.0.2.1:40000") -> TrafficChunk:
    return TrafficChunk(data, src, "[2001:db8::1]:8080", Direction.TO_OBSERVED, 1700000000.25,
                        flow, gap)


@pytest.mark.parametrize(("url", "want"), [
    ("nats://127.0.0.1:4223/mirror.test", NatsTarget("127.0.0.1", 4223, "mirror.test")),
    ("nats://broker/fleet.node-1.http", NatsTarget("broker", 4222, "fleet.node-1.http")),
    ("NATS://[::1]:5000/a", NatsTarget("::1", 5000, "a")),
])
def test_urls(url: str, want: NatsTarget) -> None:
    assert parse_nats_url(url) == want
    assert parse_nats_url(want.url) == want


@pytest.mark.parametrize(("url", "why"), [
    ("http://h:1/s", "not a nats:// URL"), ("nats://h:1/", "no subject"),
    ("nats://h:1", "no subject"), ("nats:///s", "no host"), ("nats://h:x/s", "Port"),
    ("nats://h:0/s", "port 0"), ("nats://@h:1/s", "empty credential"),
    ("nats://h:1/s?x=1", "query"), ("nats://h:1/a.*", "wildcards"), ("nats://h:1/a..b", "dotted"),
    ("nats://h:1/a.>", "wildcards"), ("nats://h:1/a b", "spaces"),
])
def test_bad_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_nats_url(url)


def test_stream_name_is_the_subject_made_a_name() -> None:
    assert stream_name("mirror.test") == "mirror_test"
    assert stream_name("fleet.node-1.$x") == "fleet_node-1__x"
    assert NatsTarget("h", 1, "a.b").stream == "a_b"


def test_a_chunk_and_an_end_survive_a_message() -> None:
    chunk = _chunk(gap=3)
    body, headers = encode_chunk(chunk, b"payload")
    assert headers == {"Mirror-Kind": "chunk", "Mirror-Flow": "7",
                       "Mirror-From": "192.0.2.1:40000", "Mirror-To": "[2001:db8::1]:8080",
                       "Mirror-Direction": "to_observed", "Mirror-Gap": "3"}
    rec = decode(body, headers)
    assert (rec.kind, rec.flow_id, rec.direction, rec.seen_at, rec.gap_bytes, rec.from_addr,
            rec.to_addr, rec.data) == ("chunk", 7, Direction.TO_OBSERVED, 1700000000.25, 3,
                                       chunk.from_addr, chunk.to_addr, b"payload")
    body, headers = encode_end(FlowEnd(7, "rst", 5))
    end = decode(body, headers)
    assert (end.kind, end.flow_id, end.gap_bytes, end.data) == ("end", 7, 5, b"rst")
    assert decode(body, None) == end  # headers are optional


def test_bad_messages_are_refused() -> None:
    body, headers = encode_chunk(_chunk(), b"x" * 100)
    with pytest.raises(BadMessage, match="CRC"):
        decode(body[:-1] + b"y", headers)
    with pytest.raises(BadMessage, match="length"):
        decode(body[:-1], headers)
    with pytest.raises(BadMessage, match="too short"):
        decode(b"abc", None)
    with pytest.raises(BadMessage, match="disagree"):
        decode(body, {**headers, "Mirror-Flow": "8"})


def test_pieces_fit_under_max_payload() -> None:
    assert piece_size(1 << 20) == (1 << 20) - 4096
    assert piece_size(100) == 1024


def test_dropped_bytes_are_owed_to_the_next_record_of_the_flow() -> None:
    ledger = GapLedger()
    first = ledger.charge(_chunk(gap=2))
    ledger.owe(first, 10)  # dropped: its gap and its 10 bytes are owed
    assert ledger.charge(_chunk(src="192.0.2.9:1")).gap_bytes == 0  # another sender
    assert ledger.charge(_chunk(gap=1)).gap_bytes == 13
    assert ledger.charge(_chunk()).gap_bytes == 0  # paid
    ledger.owe(_chunk(), 4)
    ledger.owe(_chunk(flow=8), 6)
    assert ledger.settle_end(FlowEnd(7, "fin", 1)).trailing_gap == 5
    assert len(ledger) == 1  # flow 8's debt stays


def test_every_recorder_stat_is_declared() -> None:
    rec = NatsRecorder(NatsTarget("127.0.0.1", 1, "s"))
    stats = rec.stats()
    assert metrics.undeclared({"record": stats}) == []
    assert {f"nats_dropped_records_{r}" for r in metrics.NATS_REASONS} <= set(stats)
    assert rec.handoffs()[0].name in metrics.HANDOFFS
    rec.close()


def test_options_refuse_what_a_stream_cannot_do() -> None:
    ok = PipelineOptions(ports=(80,), record="nats://h:1/s")
    assert ok.record == "nats://h:1/s"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"record_format": "jsonl"}, "native"), ({"record_compress": "gzip"}, "needs a file"),
        ({"record": "nats://h:1/"}, "no subject")]
    for kw, why in cases:
        with pytest.raises(OptionError, match=why):
            PipelineOptions(**{"ports": (80,), "record": "nats://h:1/s", **kw})


def test_outputs_hand_the_target_on_and_open_nothing() -> None:
    out = RunOutputs("nats://127.0.0.1:4222/a.b", None, False)
    assert out.record == NatsTarget("127.0.0.1", 4222, "a.b")
    assert out.finish(None) == []
    with pytest.raises(OutputError, match="no subject"):
        RunOutputs("nats://h:1", None, False)
    with pytest.raises(OutputError, match="need a file"):
        RunOutputs("nats://h:1/s", None, False, record_files=RecordPolicy(None, None, "gzip"))
