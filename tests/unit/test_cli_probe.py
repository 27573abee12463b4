"""Findings of a probe of the command line, each pinned: bad flags exit 2 with one line that
names the flag, outputs never clobber inputs or land beside the caller's streams, hooks that
break the contract abort the run naming the hook, a second signal cuts the final wait short.

``run`` is exercised in-process with its capture stubbed out (:func:`no_capture`): nothing
here attaches to an interface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from structlog.testing import capture_logs

from agent.cli.args import ephemeral_overlap, ip_only_filter
from agent.cli.commands import main
from agent.cli.layers import parse_options
from agent.hooks import HookError, HookFunc, HookPipeline
from agent.mirror.lograte import RateLimitedLog
from agent.model import Direction, TrafficChunk
from agent.sinks.record import NativeReader
from agent.sources import SourceError
from agent.sources.ebpf.privileges import CAPS, Host, check_capabilities
from tests.unit.shadow import Shadow, blackhole

# Metrics (agent/metrics.py) this file reads from stats.
REASSEMBLY_FLOWS_OPENED = "mirror_agent_reassembly_flows_opened_total"

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
ROOT = Path(__file__).resolve().parents[2]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    return lines[0]


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``main(argv)`` must exit 2 with one line; that line."""
    assert main(argv) == 2
    return one_line(capsys.readouterr().err)


def offline(*args: str, stdout: int | IO[Any] | None = subprocess.PIPE, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "offline", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=60, cwd=cwd, env=env)


@pytest.fixture
def no_capture(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``run`` gets past its start-up checks but never captures: the pipeline is replaced by
    one that records its arguments and returns 0."""
    import agent.cli.args
    import agent.cli.commands
    import agent.sources.ebpf.attach
    import agent.sources.ebpf.source

    calls: list[object] = []
    monkeypatch.setattr(agent.sources.ebpf.source, "check_environment", lambda **kw: None)
    monkeypatch.setattr(agent.sources.ebpf.attach, "resolve_ifaces", lambda spec: spec.split(","))
    monkeypatch.setattr(agent.cli.args, "preflight_ebpf", lambda *a: None)

    def pipeline(args: object, config: object, make_source: object, **kw: object) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(agent.cli.commands, "run_pipeline", pipeline)
    return calls


RUN = ["run", "--iface", "lo", "--port", "8080"]


# ------------------------------------------------------------------ 1: outputs vs inputs


@pytest.mark.parametrize("flag", ["--record", "--stats-json"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_an_output_naming_the_input_is_refused(tmp_path: Path, flag: str, how: str) -> None:
    cap = tmp_path / "v1.pcap"
    cap.write_bytes(DEMO.read_bytes())
    out = cap
    if how == "symlink":
        out = tmp_path / "link.pcap"
        out.symlink_to(cap)
    elif how == "hardlink":
        out = tmp_path / "hard.pcap"
        os.link(cap, out)
    res = offline(str(cap), "--port", "8080", flag, str(out), "--overwrite")
    assert res.returncode == 2
    assert f"{flag} names the input file {out}" in one_line(res.stderr)
    assert cap.read_bytes() == DEMO.read_bytes()


def test_stdout_redirected_onto_the_input_is_refused(tmp_path: Path) -> None:
    cap = tmp_path / "v1.pcap"
    cap.write_bytes(DEMO.read_bytes())
    with cap.open("ab") as appended:
        res = offline(str(cap), "--port", "8080", "--record", "-", stdout=appended)
    assert res.returncode == 2 and "input file" in one_line(res.stderr)
    assert cap.read_bytes() == DEMO.read_bytes()


# ------------------------------------------------------------------ 2: --redact-headers


def redacted(rec: Path) -> bytes:
    with rec.open("rb") as f:
        return b"".join(r.data for r in NativeReader(f) if r.kind == "chunk")


def test_redact_headers_alone_does_not_swallow_a_file(tmp_path: Path) -> None:
    rec = tmp_path / "r.bin"
    res = offline("--port", "8080", "--record", str(rec), "--redact-headers", str(DEMO))
    assert res.returncode == 0, res.stderr
    data = redacted(rec)
    assert b"s3cret" not in data and b"id=42" not in data
    assert data.count(b"[REDACTED]") == 2


def test_redact_headers_names_go_after_equals(tmp_path: Path) -> None:
    rec = tmp_path / "r.bin"
    res = offline(str(DEMO), "--port", "8080", "--record", str(rec),
                  "--redact-headers=X-Seq,cookie")
    assert res.returncode == 0, res.stderr
    data = redacted(rec)
    assert b"X-Seq: 0" not in data and b"id=42" not in data and b"s3cret" in data


@pytest.mark.parametrize("argv,needle", [
    (["--redact-headers="], "--redact-headers: no header name given"),
    (["--redact-headers=,"], "--redact-headers: no header name given"),
    (["--redact-headers=bad/name"], "not a valid header name"),
    (["--redact-headers", "X-Token"], "--redact-headers=X-Token"),
    (["--redact-headers", ""], "an empty argument follows it"),
])
def test_redact_headers_bad_names_exit_2(argv: list[str], needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["offline", str(DEMO), "--port", "8080", *argv], capsys)
    assert needle in line


# ------------------------------------------------------------------ 3, 4, 6: streams


@pytest.mark.parametrize("name", ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1", "-"])
def test_stats_to_stdout_redirected_to_a_file_is_written_there(tmp_path: Path,
                                                               name: str) -> None:
    out = tmp_path / "out.txt"
    out.write_text("before\n")
    try:
        with out.open("a") as f:
            res = offline(str(DEMO), "--port", "8080", "--stats-json", name, stdout=f,
                          cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        text = out.read_text()
        assert text.startswith("before\n")
        assert json.loads(text[len("before\n"):])[REASSEMBLY_FLOWS_OPENED] == 7
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    finally:
        stray = Path("/dev/stdout.1")
        if stray.is_file():
            stray.unlink()
            pytest.fail("wrote /dev/stdout.1")


def test_record_to_dev_stderr_redirected_to_a_file(tmp_path: Path) -> None:
    err = tmp_path / "err.bin"
    with err.open("wb") as f:
        res = subprocess.run([*AGENT, "--log-level", "error", "offline", str(DEMO), "--port",
                              "8080", "--record", "/dev/stderr"], stderr=f, timeout=60)
    try:
        assert res.returncode == 0
        raw = err.read_bytes()
        assert raw.count(b"MIRRORAG") == 1 and b"mirror-agent summary" in raw
    finally:
        stray = Path("/dev/stderr.1")
        if stray.is_file():
            stray.unlink()
            pytest.fail("wrote /dev/stderr.1")


@pytest.mark.parametrize("argv", [
    ["--record", "-", "--stats-json", "-"],
    ["--record", "-", "--stats-json", "/dev/stdout"],
])
def test_both_outputs_on_stdout_are_refused(argv: list[str]) -> None:
    res = offline(str(DEMO), "--port", "8080", *argv)  # not in-process: it may write stdout
    assert res.returncode == 2 and res.stdout == ""
    assert "--record and --stats-json" in one_line(res.stderr)


@pytest.mark.parametrize("command", [
    "offline {demo} --port 8080 --record -",
    "offline {demo} --port 8080 --stats-json -",
    "inspect {rec}",
])
def test_a_closed_stdout_is_a_usage_error(tmp_path: Path, command: str) -> None:
    rec = tmp_path / "r.bin"
    assert offline(str(DEMO), "--port", "8080", "--record", str(rec)).returncode == 0
    cmd = " ".join(AGENT) + " " + command.format(demo=DEMO, rec=rec)
    res = subprocess.run(["bash", "-c", f"{cmd} >&-"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert "stdout is closed" in one_line(res.stderr)


# ------------------------------------------------------------------ 5, 10, 12, 13: targets


@pytest.mark.parametrize("target,needle", [
    ("127.0.0.1", "not HOST:PORT"),
    ("[::1]", "not HOST:PORT"),
    ("", "empty"),
    ("http://127.0.0.1:18080", "without a scheme"),
    ("[::1:18081", "bracket"),
    ("::1:18081", "brackets"),
    ("a b:80", "not a host name or address"),
    ("127.0.0.1:\u00b2", "port '\u00b2' is not a number"),
    ("127.0.0.1:0", "out of range 1-65535"),
    ("127.0.0.1:99999", "out of range 1-65535"),
])
@pytest.mark.parametrize("command", ["offline", "run"])
def test_bad_targets_exit_2_at_parse_time(target: str, needle: str, command: str,
                                          no_capture: list[object],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = (["offline", str(DEMO), "--port", "8080"] if command == "offline" else RUN)
    line = usage_error([*argv, "--target", target], capsys)
    assert line.startswith("mirror-agent: error: argument --target: ") and needle in line
    assert not no_capture


@pytest.mark.parametrize("command", ["offline", "run"])
def test_a_target_that_does_not_resolve_exits_2(command: str, no_capture: list[object],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = (["offline", str(DEMO), "--port", "8080"] if command == "offline" else RUN)
    line = usage_error([*argv, "--target", "nosuchhost.invalid:80"], capsys)
    assert "target host 'nosuchhost.invalid' does not resolve" in line
    assert not no_capture


def test_good_targets_pass(no_capture: list[object]) -> None:
    for target in ("127.0.0.1:18080", "[::1]:18080", "localhost:80"):
        assert main([*RUN, "--port", "9000", "--target", target]) == 0
    assert len(no_capture) == 3


# ------------------------------------------------------------------ 7: --filter on eBPF


@pytest.mark.parametrize("expr", ["vlan", "ether dst 0:0:0:0:0:0", "not mpls", "llc",
                                  "(tcp and vlan 10)", "ether[0] = 1", "broadcast", "arp"])
@pytest.mark.parametrize("engine", ["tc", "xdp"])
def test_link_layer_filters_are_refused_on_ebpf(expr: str, engine: str,
                                                no_capture: list[object],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error([*RUN, "--engine", engine, "--filter", expr], capsys)
    assert f"--filter {expr!r}" in line and "IP/TCP only" in line
    assert not no_capture


@pytest.mark.parametrize("expr", ["host 192.0.2.1", "host vlan-gw.example", "ip broadcast",
                                  "tcp[13] & 2 != 0", "ip6 and port 80", "host ether.example"])
def test_ip_filters_pass_the_link_layer_check(expr: str) -> None:
    assert ip_only_filter(expr) is None


def test_afpacket_filter_error_names_the_users_expression(
        no_capture: list[object], capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error([*RUN, "--engine", "afpacket", "--filter", "vlan"], capsys)
    assert "--filter 'vlan'" in line and "portrange" not in line and "ip6[" not in line
    assert not no_capture


# ------------------------------------------------------------------ 8: hook results


def chunk(data: bytes = b"GET / HTTP/1.1\r\n\r\n") -> TrafficChunk:
    return TrafficChunk(data, "192.0.2.1:1000", "192.0.2.2:80", Direction.TO_OBSERVED, 0.0, 1)


def wrong(c: TrafficChunk) -> tuple[bytes, bool]:
    return "text", True  # type: ignore[return-value]


@pytest.mark.parametrize("result,shown", [
    ("text", "str"), (("text", True), "(str, bool)"), ((b"x", 1), "(bytes, int)"),
    (None, "NoneType"), ((b"x",), "(bytes)"),
])
def test_a_hook_returning_the_wrong_type_is_named(result: object, shown: str) -> None:
    pipe = HookPipeline([HookFunc(lambda c: result)])  # type: ignore[arg-type,return-value]
    with pytest.raises(HookError) as e:
        pipe.handle(chunk())
    assert f"returned {shown}, expected (bytes, bool)" in str(e.value)
    assert "test_cli_probe" in str(e.value)


HOOK_MODULE = "def handle(chunk):\n    return 'text', True\n"


@pytest.mark.parametrize("forward", [False, True])
def test_a_hook_of_the_wrong_type_aborts_the_run(tmp_path: Path, forward: bool) -> None:
    (tmp_path / "badhook.py").write_text(HOOK_MODULE)
    shadow = Shadow()
    try:
        where = ["--target", shadow.addr] if forward else ["--record", str(tmp_path / "r")]
        res = offline(str(DEMO), "--port", "8080", "--hook", "badhook:handle", *where,
                      env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    finally:
        shadow.close()
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == ("mirror-agent: failed: hook badhook:handle returned (str, bool), expected "
                    "(bytes, bool)")


# ------------------------------------------------------------------ 9, 13, 26: numbers


@pytest.mark.parametrize("flag,value,needle", [
    ("--idle-timeout", "nan", "not a finite number"),
    ("--idle-timeout", "inf", "not a finite number"),
    ("--idle-timeout", "0", "must be more than 0"),
    ("--hole-timeout", "nan", "not a finite number"),
    ("--hole-timeout", "-1", "must not be negative"),
    ("--stats-interval", "nan", "not a finite number"),
    ("--stats-interval", "-5", "0 (never) or at least 0.1"),
    ("--stats-interval", "0.01", "0 (never) or at least 0.1"),
    ("--sample", "nan", "not a finite number"),
    ("--sample", "1.5", "between 0 and 1"),
    ("--max-flows", "0", "at least 1"),
    ("--max-flow-buffer", "-1", "at least 1"),
    ("--max-buffer", "x", "'x' is not a whole number"),
])
def test_bad_numbers_name_the_flag(flag: str, value: str, needle: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["offline", str(DEMO), "--port", "8080", f"{flag}={value}"], capsys)
    assert line.startswith(f"mirror-agent: error: argument {flag}: ") and needle in line


# ------------------------------------------------------------------ 11: a second signal


def test_a_second_signal_cuts_the_final_wait_short(tmp_path: Path) -> None:
    rec = tmp_path / "r.bin"
    lines: list[str] = []
    # The target never completes a connect: the agent's close waits its 5 s.
    with blackhole() as target, subprocess.Popen(
            [*AGENT, "offline", str(DEMO), "--port", "8080", "--target", target,
             "--record", str(rec)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
        reader.start()
        time.sleep(1.5)  # the replay (milliseconds) is over: waiting for the shadow
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 3
        while not any("signal again to stop waiting" in ln for ln in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        took = time.monotonic() - start
        reader.join(5)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert took < 2, took
    assert "Traceback" not in err and "mirror-agent summary" in err
    assert "stopped waiting for the shadow" in err
    with rec.open("rb") as f:  # the recording was flushed all the same
        assert sum(1 for r in NativeReader(f) if r.kind == "chunk") == 7


# ------------------------------------------------------------------ 12, 13, 23: headers


@pytest.mark.parametrize("header,needle", [
    ("", "expected 'NAME: VALUE'"),
    ("X-A", "expected 'NAME: VALUE'"),
    ("X: \u20ac", "printable ASCII"),
    ("X: a\tb\x01", "printable ASCII"),
    ("Content-Length: 5", "Content-Length"),
    ("transfer-encoding: chunked", "transfer-encoding"),
    ("Host: shadow", "Host"),
    ("Connection: close", "Connection"),
    ("X(1): y", "not a valid header name"),
    ("X Y: z", "not a valid header name"),
])
def test_bad_injected_headers_exit_2(header: str, needle: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["offline", str(DEMO), "--port", "8080", "--inject-header", header],
                       capsys)
    assert line.startswith("mirror-agent: error: argument --inject-header: ") and needle in line


# ------------------------------------------------------------------ 16, 17: paths


@pytest.mark.parametrize("argv,needle", [
    (["offline", str(DEMO), "--port", "80", "--record", ""], "argument --record: empty path"),
    (["offline", str(DEMO), "--port", "80", "--stats-json", ""],
     "argument --stats-json: empty path"),
    (["offline", "", "--port", "80"], "empty path"),
    (["inspect", ""], "empty path"),
    (["offline", str(DEMO), "--port", "80", "--record", "out/zz/"], "ends in /"),
    (["offline", str(DEMO), "--port", "80", "--stats-json", "zz/"], "ends in /"),
])
def test_empty_and_directory_paths_exit_2(argv: list[str], needle: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in usage_error(argv, capsys)


# ------------------------------------------------------------------ 20: --iface


def test_duplicate_interfaces_are_dropped_in_order() -> None:
    args = parse_options(["run", "--iface", "lo, eth0,lo,eth0", "--port", "80"])
    assert args.live.iface == "lo,eth0"


# ------------------------------------------------------------------ 21: CAP_IPC_LOCK


def host(caps: int) -> Host:
    return Host(caps=caps, cap_last=40, uid=1000, cpus=2, possible_cpus=2, perf_mlock_kb=516,
                perf_paranoid=2, memlock_rlimit=8 << 20, mem_available=64 << 30,
                cgroup_limit=None)


def test_missing_capabilities_include_ipc_lock_when_the_rings_need_it() -> None:
    with pytest.raises(SourceError) as e:
        check_capabilities(host(0), ebpf=True, mib=16, transport="perf")
    assert "lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_IPC_LOCK:" in str(e.value)
    # Rings that fit RLIMIT_MEMLOCK, or the ring buffer: not needed, not named.
    for mib, transport in ((1, "perf"), (16, "ringbuf")):
        with pytest.raises(SourceError) as e:
            check_capabilities(host(0), ebpf=True, mib=mib, transport=transport)
        assert "CAP_IPC_LOCK" not in str(e.value)
    # Only CAP_IPC_LOCK missing: check_memlock says it, with the sizes.
    ebpf = sum(1 << CAPS[c] for c in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"))
    check_capabilities(host(ebpf), ebpf=True, mib=16, transport="perf")


# ------------------------------------------------------------------ 26: log floods


def test_flows_ended_by_a_limit_are_logged_once_per_interval() -> None:
    res = offline(str(DEMO), "--port", "8080", "--max-flows", "1")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stderr.splitlines() if "ended by a limit" in ln]
    assert len(lines) == 1, lines


def test_rate_limited_log_counts_what_it_left_out() -> None:
    now = [0.0]
    with capture_logs() as logs:
        import structlog

        rl = RateLimitedLog(structlog.get_logger("t"), 10.0, clock=lambda: now[0])
        for _ in range(5):
            rl.info("evicted", "evicted", flow_id=1)
        rl.info("lifetime", "lifetime")
        now[0] = 11.0
        rl.info("evicted", "evicted", flow_id=2)
    assert [(e["event"], e.get("not_logged")) for e in logs] == [
        ("evicted", None), ("lifetime", None), ("evicted", 4)]


# ------------------------------------------------------------------ 27: source ports


def test_privileged_source_ports_need_net_bind_service(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import agent.cli.args

    monkeypatch.setattr(agent.cli.args, "effective_caps", lambda: 0)
    line = usage_error(["offline", str(DEMO), "--port", "8080", "--target", "127.0.0.1:9",
                        "--forward-source-ports", "100-200"], capsys)
    assert "--forward-source-ports 100-200" in line and "CAP_NET_BIND_SERVICE" in line
    # Without a target nothing binds them: no check.
    assert main(["offline", str(DEMO), "--port", "8080", "--forward-source-ports",
                 "100-200"]) == 0


def test_source_ports_overlapping_the_ephemeral_range_are_warned_about(
        tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_local_port_range"
    sysctl.write_text("32768\t60999\n")
    assert ephemeral_overlap((61000, 65535), sysctl) is None
    msg = ephemeral_overlap((60000, 65535), sysctl)
    assert msg is not None and "32768-60999" in msg and "32768 59999" in msg
    msg = ephemeral_overlap((20000, 40000), sysctl)
    assert msg is not None and "40001 60999" in msg
    assert ephemeral_overlap((60000, 65535), tmp_path / "missing") is None


def test_run_warns_about_an_ephemeral_overlap(no_capture: list[object],
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import agent.cli.args

    monkeypatch.setattr(agent.cli.args, "ephemeral_overlap", lambda ports: "overlaps it")
    assert main(["--log-format", "json", *RUN, "--forward-source-ports", "40000-41000"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "overlaps it"


@pytest.fixture(autouse=True)
def _in_tmp_and_restore_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                ) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # a regression writes its stray files there, not in the repo
    yield
    from agent.cli.logsetup import configure_logging

    configure_logging("info", True)
