"""Traffic selection and rewriting from the command line (agent/cli/select.py): flags, config
keys and variables, the hooks they make, and a capture replayed offline to a loopback shadow
that must receive exactly the selected requests, rewritten."""

from __future__ import annotations

import base64
import itertools
import json
import re
from pathlib import Path

import pytest

from agent import metrics
from agent.cli.commands import main
from agent.cli.configure import hooks as pipeline_hooks
from agent.cli.configure import mirror_config
from agent.cli.layers import parse_options
from agent.cli.parser import UsageError
from agent.cli.select import SelectOptions
from agent.hooks.rewrite import RewriteRequests
from agent.hooks.select import SelectRequests, hook_stats
from agent.mirror.driver import TrafficMirror
from agent.model import ACK, FIN, PSH, SYN
from agent.sources.files.pcapfile import PcapFileSource
from agent.sources.filter import synthesize_frame
from tests.unit.shadow import Shadow, wait_until
from tests.unit.test_mirror_unobserved import write_pcap

OFFLINE = ["offline", "x.pcap", "--port", "80"]


def test_flags_make_select_options_and_hooks() -> None:
    opts = parse_options([*OFFLINE, "--target", "127.0.0.1:9", "--allow-method", "get,HEAD",
                          "--allow-method", "POST", "--deny-path", "^/a{1,3}$",
                          "--deny-header", "X-Debug:", "--sample-by-header", "X-User-Id:10%",
                          "--rate-limit", "100/s", "--rewrite-path", "^/v1/=/v2/",
                          "--rewrite-host", "shadow:80", "--inject-header", "X-M: 1"], {})
    s = opts.pipe.select
    assert s.allow_method == ("GET,HEAD", "POST") and s.deny_path == ("^/a{1,3}$",)
    sel = s.selection()
    assert sel.allow_methods == {"GET", "HEAD", "POST"} and sel.rate == 100.0
    forward, record = pipeline_hooks(opts.pipe)
    assert [type(h).__name__ for h in forward] == ["OnlyToObserved", "SelectRequests",
                                                   "RewriteRequests", "InjectHeader"]
    assert [type(h).__name__ for h in record] == ["OnlyToObserved", "SelectRequests"]
    assert forward[1] is not record[1]  # each path frames and rate-limits on its own
    assert opts.values["allow-method"] == ["GET,HEAD", "POST"]


@pytest.mark.parametrize(("select_for", "paths"), [("forward", (1, 0)), ("record", (0, 1))])
def test_select_for_one_path(select_for: str, paths: tuple[int, int]) -> None:
    opts = parse_options([*OFFLINE, "--deny-method", "POST", "--select-for", select_for], {})
    forward, record = pipeline_hooks(opts.pipe)
    assert (sum(isinstance(h, SelectRequests) for h in forward),
            sum(isinstance(h, SelectRequests) for h in record)) == paths


def test_no_selection_flags_add_no_hooks() -> None:
    assert SelectOptions().select_hooks() == ([], []) and SelectOptions().rewrite_hooks() == []
    forward, record = pipeline_hooks(parse_options(OFFLINE, {}).pipe)
    assert not any(isinstance(h, SelectRequests | RewriteRequests) for h in forward + record)


def test_regexes_keep_their_commas_in_the_file_and_environment(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('allow-path = "^/a{1,3}$"\ndeny-header = ["X-A: ^(b|c),d$", "X-B:"]\n'
                    'deny-method = "PUT,DELETE"\nrewrite-path = ["x{2,}=y"]\n'
                    'target = "127.0.0.1:9"\n')
    env = {"MIRROR_AGENT_DENY_PATH": "^/b{1,2}", "MIRROR_AGENT_RATE_LIMIT": "5/s"}
    s = parse_options([*OFFLINE, "--config", str(conf)], env).pipe.select
    assert s.allow_path == ("^/a{1,3}$",) and s.deny_path == ("^/b{1,2}",)
    assert s.deny_header == ("X-A: ^(b|c),d$", "X-B:") and s.deny_method == ("PUT", "DELETE")
    assert s.rewrite_path == ("x{2,}=y",) and s.rate_limit == "5/s"


@pytest.mark.parametrize(("args", "message"), [
    (["--allow-path", "("], "argument --allow-path: '(' is not a valid regular expression"),
    (["--deny-header", "X A: b"], "argument --deny-header: 'X A' is not a valid header name"),
    (["--rate-limit", "0/s"], "argument --rate-limit: '0/s' must be a rate above 0"),
    (["--sample-by-header", "X-U:150%"], "between 0% and 100%"),
    (["--rewrite-path", "^/a"], "expected REGEX=REPLACEMENT"),
    (["--rewrite-host", "a b"], "is not a host name"),
    (["--rewrite-path", "^/a=/b"], "need --target"),
])
def test_bad_values_exit_2_naming_the_flag(args: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    write_pcap(tmp_path / "x.pcap", [])
    assert main(["offline", str(tmp_path / "x.pcap"), "--port", "80", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-agent: error: ") and message in err, err
    assert err.count("\n") == 1


def test_a_bad_variable_is_named() -> None:
    with pytest.raises(UsageError, match=re.escape("environment MIRROR_AGENT_ALLOW_HEADER")):
        parse_options(OFFLINE, {"MIRROR_AGENT_ALLOW_HEADER": "no colon"})


# ---------------------------------------------------------------- offline, to a shadow

CLIENT, SERVER = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 1])
BODY = b'{"item": 1, "note": "GET /inside HTTP/1.1"}'
KEEP = b"GET /api/v1/users?id=7 HTTP/1.1\r\nHost: prod\r\nX-User-Id: u1\r\n\r\n"
POST = (b"POST /api/v1/orders HTTP/1.1\r\nHost: prod\r\nContent-Length: %d\r\n\r\n%s"
        % (len(BODY), BODY))
DELETE = b"DELETE /api/v1/orders/3 HTTP/1.1\r\nHost: prod\r\n\r\n"
ADMIN = b"GET /admin/stats HTTP/1.1\r\nHost: prod\r\n\r\n"
PUT = (b"PUT /files/a HTTP/1.1\r\nHost: prod\r\nTransfer-Encoding: chunked\r\n\r\n"
       b"3\r\nabc\r\n0\r\n\r\n")


def connection(port: int, client_bytes: bytes, cuts: list[int]) -> list[bytes]:
    """The frames of one connection to port 80 whose client sends ``client_bytes`` in
    segments cut at ``cuts`` (mid-request too), then both FINs."""
    c_isn, s_isn = 1000 + port, 9000

    def frame(from_client: bool, offset: int, payload: bytes = b"",
              flags: int = ACK | PSH) -> bytes:
        if from_client:
            seq = c_isn if flags & SYN else c_isn + 1 + offset
            return synthesize_frame(CLIENT, SERVER, port, 80, payload, seq, s_isn + 1, flags)
        seq = s_isn if flags & SYN else s_isn + 1 + offset
        return synthesize_frame(SERVER, CLIENT, 80, port, payload, seq, c_isn + 1, flags)

    bounds = [0, *cuts, len(client_bytes)]
    data = [frame(True, a, client_bytes[a:b]) for a, b in itertools.pairwise(bounds)]
    return [frame(True, 0, flags=SYN), frame(False, 0, flags=SYN | ACK),
            frame(True, 0, flags=ACK), *data, frame(True, len(client_bytes), flags=FIN | ACK),
            frame(False, 0, flags=FIN | ACK)]


def test_offline_shadow_gets_exactly_the_selected_requests_rewritten(tmp_path: Path) -> None:
    first = KEEP + POST + DELETE + KEEP
    second = ADMIN + PUT
    frames = (connection(40001, first, [10, len(KEEP) + 30, len(KEEP + POST) + 5])
              + connection(40002, second, [len(ADMIN) - 1, len(ADMIN) + 50])
              + connection(40003, DELETE, [7]))
    pcap, rec = tmp_path / "c.pcap", tmp_path / "rec.jsonl"
    write_pcap(pcap, frames)
    shadow = Shadow()
    try:
        assert main(["offline", str(pcap), "--port", "80", "--target", shadow.addr,
                     "--deny-method", "DELETE", "--deny-path", "^/admin/",
                     "--rewrite-path", "^/api/v1/=/api/v2/", "--rewrite-host", "shadow.test",
                     "--record", str(rec), "--record-format", "jsonl"]) == 0
        wait_until(lambda: len(shadow.received) == 2)
    finally:
        shadow.close()

    def shadowed(data: bytes) -> bytes:
        return data.replace(b"/api/v1/", b"/api/v2/").replace(b"Host: prod",
                                                              b"Host: shadow.test")

    assert sorted(shadow.received) == sorted([shadowed(KEEP + POST + KEEP), shadowed(PUT)])
    assert len(shadow.peers) == 2  # the connection with nothing selected made none
    recorded: dict[str, bytes] = {}
    for line in rec.read_text().splitlines():
        r = json.loads(line)
        if "data" in r:
            recorded[r["from"]] = recorded.get(r["from"], b"") + base64.b64decode(r["data"])
    assert recorded == {"192.0.2.1:40001": KEEP + POST + KEEP, "192.0.2.1:40002": PUT}



def test_the_counters_reach_the_registry_through_the_configs_hooks(tmp_path: Path) -> None:
    """What ``TrafficMirror.stage_stats`` collects with ``hook_stats`` of its config's hooks
    (the mirror's side of the wiring)."""
    frames = connection(40001, KEEP + DELETE + ADMIN + KEEP, [5, 70])
    pcap = tmp_path / "c.pcap"
    write_pcap(pcap, frames)
    shadow = Shadow()
    try:
        opts = parse_options(["offline", str(pcap), "--port", "80", "--target", shadow.addr,
                              "--deny-method", "DELETE", "--deny-path", "^/admin/",
                              "--rewrite-host", "s"], {})
        m = TrafficMirror(mirror_config(opts))
        m.run(PcapFileSource([pcap]))
    finally:
        shadow.close()
    stats = hook_stats(m.config.forward_hook, m.config.record_hook)
    assert stats["select_forward_requests"] == stats["select_record_requests"] == 4
    assert stats["select_forward_unselected_method"] == 1
    assert stats["select_record_unselected_path"] == 1
    assert stats["select_forward_dropped_bytes"] == len(DELETE + ADMIN)
    assert stats["rewrite_hosts"] == 2
    assert metrics.undeclared({"mirror": {**m.counters, **stats}}) == []
