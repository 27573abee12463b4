"""Response diff (agent.replay.diff) and the report (agent.replay.report), without sockets."""

from __future__ import annotations

import json

from agent.replay.diff import Differ, fields
from agent.replay.http import Request, Response
from agent.replay.report import Latency, Source, Tally, format_report, report_json


def resp(status: int, body: bytes = b"", **headers: str) -> Response:
    head = f"HTTP/1.1 {status} X" + "".join(f"\r\n{k.replace('_', '-')}: {v}"
                                             for k, v in headers.items())
    return Response(status, head.encode(), body)


def req(path: str, method: str = "GET") -> Request:
    return Request(method, path, 0)


def test_fields_json_leaves_headers_and_ignored() -> None:
    r = resp(200, b'{"a": {"b": [1, 2]}, "c": "x"}', Date="now", X_Thing="1")
    f = fields(r, frozenset({"date"}))
    assert f == {"status": 200, "header x-thing": "1", "body $.a.b[0]": 1,
                 "body $.a.b[1]": 2, "body $.c": "x"}
    assert fields(resp(200, b"plain"), frozenset()) == {"status": 200, "body": b"plain"}


def test_diff_against_production_names_the_path() -> None:
    d = Differ()
    ok = resp(200, b"fine", Date="a")
    reqs = [req("/ok?q=1"), req("/broken"), req("/ok?q=2")]
    d.add(reqs, [ok, ok, ok], [resp(200, b"fine", Date="b"), resp(500, b"oops"), ok], None)
    s = d.summary(production=True)
    assert (s["compared"], s["different_status"], s["different_body"]) == (3, 1, 1)
    assert s["different_headers"] == 0  # Date is ignored by default
    [path] = s["paths"]
    assert path["path"] == "GET /broken"
    assert path["status_changes"] == {"200 -> 500": 1}
    assert set(path["fields"]) == {"status", "body"}


def test_baseline_filters_noise_like_diffy() -> None:
    d = Differ(ignored=["Date"], with_baseline=True)

    def body(ts: int, value: str) -> bytes:
        return json.dumps({"ts": ts, "value": value}).encode()

    prod = [resp(200, body(1, "v"), X_Request_Id="p")]
    base = [resp(200, body(2, "v"), X_Request_Id="b")]
    same = [resp(200, body(3, "v"), X_Request_Id="c")]
    changed = [resp(200, body(3, "w"), X_Request_Id="c")]
    d.add([req("/same")], prod, same, base)
    d.add([req("/changed")], prod, changed, base)
    s = d.summary(production=True)
    assert s["reference"].startswith("baseline")
    assert (s["compared"], s["different_body"], s["different_headers"]) == (2, 1, 0)
    assert [p["path"] for p in s["paths"]] == ["GET /changed"]
    assert s["paths"][0]["fields"] == ["body $.value"]
    assert s["noise"] == {"body $.ts": 2, "header x-request-id": 2}


def test_missing_responses_are_not_compared() -> None:
    d = Differ()
    d.add([req("/a"), req("/b")], [resp(200), resp(200)], [resp(200)], None)
    s = d.summary(production=True)
    assert (s["compared"], s["not_compared"]) == (1, 1)


def test_latency_percentiles_are_close() -> None:
    lat = Latency()
    for i in range(1, 1001):
        lat.add(i / 1000)
    assert abs(lat.percentile(50) - 0.5) < 0.02
    assert abs(lat.percentile(99) - 0.99) < 0.03
    assert lat.percentile(100) == 1.0 == lat.max
    assert Latency().percentile(50) == 0.0


def test_report_text_and_json() -> None:
    t = Tally("127.0.0.1:1")
    t.requests_sent = 3
    for status in (200, 200, 500):
        t.response(status, 0.001)
    t.connections_ok = 1
    t.failed["refused"] += 2
    d = Differ()
    d.add([req("/x")], [resp(200)], [resp(500)], None)
    src = Source(names=["r.bin"], connections=3, requests=3,
                 problems=["r.bin: record at byte offset 99 truncated"])
    rep = report_json(src, t, None, 1.5, d.summary(True), interrupted=False)
    json.dumps(rep)
    text = format_report(rep)
    assert "3 requests on 3 recorded connection(s)" in text
    assert "200: 2  500: 1" in text
    assert "1 ok, 2 failed (refused 2)" in text
    assert "source problem: r.bin: record at byte offset 99" in text
    assert "GET /x: 1/1  status 200 -> 500 x1" in text
