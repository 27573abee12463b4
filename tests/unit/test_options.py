"""One configuration object: flags over MIRROR_AGENT_* over the --config file over defaults,
checked once (agent/cli/layers.py, agent/cli/options.py), and defaults the library shares."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.cli.configure import mirror_config
from agent.cli.layers import parse_options
from agent.cli.parser import UsageError
from agent.mirror.config import MirrorConfig
from agent.reassembly import ReassemblyConfig

RUN = ["run", "--iface", "lo"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_flags_win_over_environment_over_file(tmp_path: Path) -> None:
    conf = write(tmp_path, 'port = [80, 443]\nmemory-limit = "512MiB"\n'
                           'target = "127.0.0.1:1"\nboth-directions = true\n')
    env = {"MIRROR_AGENT_TARGET": "127.0.0.1:2", "MIRROR_AGENT_MEMORY_LIMIT": "256MiB"}
    opts = parse_options([*RUN, "--config", str(conf), "--memory-limit", "128MiB"], env)
    p = opts.pipe
    assert p.ports == (80, 443) and p.both_directions is True
    assert p.target == "127.0.0.1:2" and p.memory_limit == 128 << 20
    assert opts.origins == {"port": f"config {conf}", "both-directions": f"config {conf}",
                            "target": "env MIRROR_AGENT_TARGET", "memory-limit": "flag",
                            "iface": "flag"}
    assert opts.effective()["engine"] == ("tc", "default")


def test_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    conf = write(tmp_path, "port = 8080\n")
    opts = parse_options(RUN, {"MIRROR_AGENT_CONFIG": str(conf)})
    assert opts.pipe.ports == (8080,) and opts.config_file == conf


@pytest.mark.parametrize(("text", "needle"), [
    ("prot = 80\n", "unknown key 'prot'"),
    ("port = 99999\n", "port: port 99999 is out of range"),
    ("engine = \"ebpf\"\n", "engine: 'ebpf' is not one of tc, xdp, afpacket"),
    ("overwrite = \"maybe\"\n", "overwrite: 'maybe' is not on or off"),
    ("[run]\nport = 80\n", "[run] is a table"),
    ("port = \n", "not valid TOML"),
    ("memory-limit = true\n", "memory-limit: True is not text, a number or a list"),
])
def test_a_bad_file_exits_2_naming_the_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str) -> None:
    conf = write(tmp_path, text)
    assert main([*RUN, "--port", "80", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(conf) in err and needle in err, err


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--port", "80", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_a_bad_variable_is_named() -> None:
    # Kubernetes service links set MIRROR_AGENT_PORT for a Service named mirror-agent.
    with pytest.raises(UsageError, match="environment MIRROR_AGENT_PORT: port 'tcp://"):
        parse_options(RUN, {"MIRROR_AGENT_PORT": "tcp://10.0.0.1:9464"})


def test_foreign_variables_and_other_commands_keys_are_left_alone(tmp_path: Path) -> None:
    conf = write(tmp_path, 'port = 80\niface = "eth0"\nengine = "xdp"\n')
    env = {"MIRROR_AGENT_SERVICE_HOST": "10.0.0.1"}
    opts = parse_options(["offline", "x.pcap", "--config", str(conf)], env)
    assert opts.capture is None and opts.pipe.ports == (80,)
    assert "iface" not in opts.values


def test_on_off_words_from_the_environment() -> None:
    on = parse_options([*RUN, "--port", "80"], {"MIRROR_AGENT_BOTH_DIRECTIONS": "yes"})
    off = parse_options([*RUN, "--port", "80"], {"MIRROR_AGENT_OVERWRITE": "0"})
    assert on.pipe.both_directions is True and off.pipe.overwrite is False


def test_required_options_say_every_way_to_give_them() -> None:
    with pytest.raises(UsageError, match=r"--port is required \(or 'port' in the --config "
                                         r"file, or MIRROR_AGENT_PORT\)"):
        parse_options(RUN, {})
    with pytest.raises(UsageError, match="--iface is required"):
        parse_options(["run", "--port", "80"], {})


def test_lists_and_headers_from_a_file(tmp_path: Path) -> None:
    conf = write(tmp_path, 'port = "80,443"\nhook = ["agent.hooks:KeepAll"]\n'
                           'redact-headers = true\ninject-header = "X-Mirror: 1"\n'
                           'forward-source-ports = "62000-62010"\n')
    p = parse_options([*RUN, "--config", str(conf)], {}).pipe
    assert p.ports == (80, 443) and p.hooks == ("agent.hooks:KeepAll",)
    assert p.redact_headers == ("Authorization", "Cookie")
    assert p.inject_header == ("X-Mirror", "1") and p.forward_source_ports == (62000, 62010)


def test_config_command_prints_toml_that_reads_back(tmp_path: Path) -> None:
    conf = write(tmp_path, 'port = [80, 443]\nforward-source-ports = "62000-62010"\n'
                           'inject-header = "X-Mirror: 1"\nsample = 0.5\n')
    res = subprocess.run([sys.executable, "-m", "agent.cli", "config", "--config", str(conf),
                          "--iface", "eth0"], capture_output=True, text=True, timeout=60,
                         env={"MIRROR_AGENT_TARGET": "127.0.0.1:9", "PATH": "/usr/bin"})
    assert res.returncode == 0, res.stderr
    assert 'target = "127.0.0.1:9"  # env MIRROR_AGENT_TARGET' in res.stdout
    assert f"port = [80, 443]  # config {conf}" in res.stdout
    again = write(tmp_path, res.stdout)
    first = parse_options(["config", "--config", str(conf), "--iface", "eth0"],
                          {"MIRROR_AGENT_TARGET": "127.0.0.1:9"})
    second = parse_options(["config", "--config", str(again)], {})
    assert tomllib.loads(res.stdout)["iface"] == "eth0"
    assert second.pipe == first.pipe and second.live == first.live


def test_library_and_cli_defaults_agree() -> None:
    opts = parse_options([*RUN, "--port", "8080"], {})  # offline has no rings to budget
    lib = MirrorConfig(observed_port=8080)
    cli = mirror_config(opts)
    assert opts.pipe.hole_timeout == ReassemblyConfig().hole_timeout
    assert cli.reassembly.hole_timeout == lib.reassembly.hole_timeout
    assert opts.pipe.idle_timeout == ReassemblyConfig().idle_timeout
    assert opts.pipe.forward_source_ports == lib.forward.source_ports
    assert cli.reassembly == lib.reassembly


@pytest.mark.parametrize(("argv", "needle"), [
    (["probe", "--listen", "127.0.0.1:9464", "/he alth"], "is not a URL path"),
    (["probe", "--listen", "127.0.0.1:9464", "http://x/healthz"], "is not a URL path"),
    (["config", "--iface", "veth[", "--port", "80"], "unbalanced [ ] in the pattern"),
    (["serve", "--listen", "127.0.0.1", "--port", "80", "--pcap-dir", "/tmp"],
     "listen address '127.0.0.1' is not HOST:PORT"),
    (["offline", "x.pcap", "--port", "80", "--target", "127.0.0.1:1", "--rewrite-host",
      "x:99999"], "port 99999 is out of range"),
])
def test_found_by_probing_the_new_flags(argv: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_a_config_file_that_is_not_utf8_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bin.toml"
    conf.write_bytes(b"# caf\xe9\nport = [8080]\n")
    assert main([*RUN, "--config", str(conf)]) == 2
    assert "not valid TOML (not UTF-8" in capsys.readouterr().err


def test_stray_variables_are_named_not_silent() -> None:
    opts = parse_options([*RUN, "--port", "80"], {"MIRROR_AGENT_TARGTE": "x",
                                                   "MIRROR_AGENT_CONFIG": "",
                                                   "MIRROR_AGENT_SERVICE_HOST": "10.0.0.1"})
    assert opts.stray_env == ("MIRROR_AGENT_SERVICE_HOST", "MIRROR_AGENT_TARGTE")
    assert opts.pipe.target is None
