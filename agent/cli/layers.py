"""Flags over ``MIRROR_AGENT_*`` environment over the ``--config`` file over defaults: the
command line's options merged and checked once into :class:`~agent.cli.options.Options`.

One schema: the parser (:func:`agent.cli.parser.build_parser`). Every long flag is a key of
the same name without ``--`` (``memory-limit``) in the TOML file (flat, top level) and the
variable ``MIRROR_AGENT_MEMORY_LIMIT``; a value from the file or the environment goes through
the flag's own check, so ``port = "99999"`` fails the way ``--port 99999`` does.

- File values: strings, numbers, booleans (for on/off flags), or lists (``port = [80, 443]``,
  ``hook = ["m:a", "m:b"]``). A key no command knows is an error (exit 2, naming the key and
  the file); a key another command takes (``iface`` for ``offline``) is left alone, so one
  file serves ``run``, ``config`` and ``probe``.
- Environment values: text as on the command line; on/off flags take 1/0, true/false,
  yes/no, on/off. ``MIRROR_AGENT_CONFIG`` names the file when ``--config`` does not. Other
  ``MIRROR_AGENT_*`` variables are ignored with a warning naming them (``stray_env``): a
  typo must not pass silently, but Kubernetes service links make ``MIRROR_AGENT_SERVICE_HOST``
  and the like, which must not stop the agent.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.cli import args as a
from agent.cli.options import (
    CaptureOptions,
    ControlOptions,
    OptionError,
    Options,
    PipelineOptions,
    ReplayOptions,
)
from agent.cli.parser import REPEATABLE, Parser, UsageError, build_parser
from agent.cli.select import select_options
from agent.sinks.nats.url import redact_url

__all__ = ["ENV_PREFIX", "parse_options"]

ENV_PREFIX = "MIRROR_AGENT_"
#: Variables of ours that are no option: the config file's path.
_NOT_KEYS = frozenset({ENV_PREFIX + "CONFIG"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _keyed(parser: Parser) -> dict[str, argparse.Action]:
    """The parser's long options by key (``--memory-limit`` → ``memory-limit``)."""
    return {opt[2:]: act for act in parser.declared for opt in act.option_strings
            if opt.startswith("--") and opt not in ("--help", "--config")}


def _suppress_defaults(parser: Parser) -> dict[str, Any]:
    """Make the parser leave out every option not given, and return the defaults by dest."""
    defaults: dict[str, Any] = {}
    for act in parser.declared:
        if act.option_strings and act.dest != "help":
            defaults[act.dest] = act.default
            act.default = argparse.SUPPRESS
    return defaults


def _convert(action: argparse.Action, raw: object, where: str) -> Any:
    """A file's or the environment's ``raw`` value for ``action``, checked as its flag is."""
    try:
        return _checked(action, raw)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None


def _checked(action: argparse.Action, raw: object) -> Any:
    if action.nargs == 0:  # an on/off flag
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            raw = raw.strip().lower() in _TRUE
        if not isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not on or off (true/false)")
        return raw if action.const is True or action.const is None else not raw
    if action in REPEATABLE:
        whole = getattr(action, "whole_values", False)  # a regex: its commas are its own
        items = (raw if isinstance(raw, list) else [raw] if whole
                 else [s for s in str(raw).split(",") if s.strip()])
        return [_one(action, item) for item in items]
    if action.nargs == "?" and raw is True:
        raw = action.const
    if isinstance(raw, list):
        raw = ",".join(str(x) for x in raw)
    return _one(action, raw)


def _one(action: argparse.Action, raw: object) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"{raw!r} is not text, a number or a list")
    text = str(raw).strip()
    value = action.type(text) if callable(action.type) else text
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{text!r} is not one of {choices}")
    return value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML (not UTF-8 at byte {e.start})"
                         ) from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise UsageError(f"--config {path}: [{key}] is a table; every key goes at the top "
                             "level (key = value)")
    return data


def _env_key(var: str) -> str:
    return var[len(ENV_PREFIX):].lower().replace("_", "-")


def _layers(command: str, keyed: dict[str, argparse.Action],
            known: set[str], given: argparse.Namespace, environ: Mapping[str, str],
            ) -> tuple[dict[str, Any], dict[str, str], Path | None]:
    """The file's and the environment's values for ``command``'s keys, by dest, with each
    key's origin; and the config file's path."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    file = getattr(given, "config", None) or environ.get(ENV_PREFIX + "CONFIG") or None
    path = Path(file) if file else None
    if path is not None:
        for key, raw in _read_file(path).items():
            if key not in known:
                raise UsageError(f"--config {path}: unknown key {key!r} (keys are the long flag "
                                 "names without --, e.g. memory-limit)")
            if key in keyed:
                act = keyed[key]
                values[act.dest] = _convert(act, raw, f"--config {path}: {key}")
                origins[key] = f"config {path}"
    for var in sorted(environ):
        key = _env_key(var)
        if var.startswith(ENV_PREFIX) and key in keyed:
            act = keyed[key]
            values[act.dest] = _convert(act, environ[var], f"environment {var}")
            origins[key] = f"env {var}"
    return values, origins, path


def parse_options(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Options:
    """The checked options of one command line. UsageError (exit 2, one line) for a bad flag,
    key, variable or combination."""
    parser = build_parser()
    subs = parser.commands
    defaults = _suppress_defaults(parser)
    for sub in subs.values():
        defaults.update(_suppress_defaults(sub))
    given = parser.parse_args(argv)
    command: str = given.command
    keyed = {**_keyed(parser), **_keyed(subs[command])}
    known = {k for p in (parser, *subs.values()) for k in _keyed(p)}
    values, origins, path = _layers(command, keyed, known, given,
                                    os.environ if environ is None else environ)
    for act in keyed.values():
        values.setdefault(act.dest, defaults.get(act.dest))
    flags = {k: v for k, v in vars(given).items() if k not in ("command", "config")}
    values.update(flags)
    for key, act in keyed.items():
        if act.dest in flags:
            origins[key] = "flag"
    shown = {key: _shown(key, values[act.dest]) for key, act in keyed.items()}
    env = os.environ if environ is None else environ
    stray = tuple(v for v in sorted(env) if v.startswith(ENV_PREFIX)
                  and _env_key(v) not in known and v not in _NOT_KEYS)
    try:
        return _build(command, values, path, shown, origins, stray)
    except OptionError as e:
        raise UsageError(str(e)) from None


def _shown(key: str, value: Any) -> Any:
    """``value`` as the key would be written in the file (ranges and headers as text)."""
    if key in ("forward-source-ports", "source-ports"):
        return "any" if value is None else f"{value[0]}-{value[1]}"
    if key == "inject-header" and value is not None:
        return f"{value[0]}: {value[1]}"
    if key == "record" and isinstance(value, str):
        return redact_url(value)  # a NATS URL's token or password: never shown
    if isinstance(value, Path):
        return str(value)
    return value


def _required(values: Mapping[str, Any], dest: str, key: str) -> Any:
    value = values.get(dest)
    if value is None or value == []:
        var = ENV_PREFIX + key.upper().replace("-", "_")
        raise OptionError(f"--{key} is required (or {key!r} in the --config file, or {var})")
    return value


def _pipeline(v: Mapping[str, Any]) -> PipelineOptions:
    redact = v.get("redact_headers") or ()
    if isinstance(redact, str):  # the flag alone, or `redact-headers = true`
        redact = a.header_names(redact)
    return PipelineOptions(
        ports=tuple(dict.fromkeys(_required(v, "port", "port"))), target=v["target"],
        forward_source_ports=v["forward_source_ports"],
        forward_source_addrs=v["forward_source_addrs"] or (), forward_mode=v["forward_mode"],
        forward_pool=v["forward_pool"], record=v["record"],
        overwrite=v["overwrite"], record_format=v["record_format"],
        record_rotate=v["record_rotate"], record_max_total=v["record_max_total"],
        record_compress=v["record_compress"], **_nats_files(v),
        both_directions=v["both_directions"], filter=v["filter"],
        hooks=tuple(v["hook"] or ()), inject_header=v["inject_header"],
        redact_headers=tuple(redact), sample=v["sample"],
        select=select_options(v),
        idle_timeout=v["idle_timeout"], hole_timeout=v["hole_timeout"],
        memory_limit=v["memory_limit"], max_flows=v["max_flows"],
        max_flow_buffer=v["max_flow_buffer"], max_buffer=v["max_buffer"],
        stats_json=v["stats_json"], stats_interval=v["stats_interval"],
        flow_pcap_dir=str(v["flow_pcap_dir"]) if v["flow_pcap_dir"] else None,
        flow_pcap_snaplen=v["flow_pcap_snaplen"], flow_pcap_gzip=v["flow_pcap_gzip"],
        anonymize=v["anonymize"])


def _nats_files(v: Mapping[str, Any]) -> dict[str, str | None]:
    """The ``--nats-*`` files of ``--record nats://`` (TLS, a credential), as text."""
    keys = ("nats_ca", "nats_cert", "nats_key", "nats_token_file", "nats_creds")
    return {k: str(v[k]) if v.get(k) else None for k in keys}


def _capture(v: Mapping[str, Any]) -> CaptureOptions:
    return CaptureOptions(iface=_required(v, "iface", "iface"), engine=v["engine"],
                          tc_attach=v["tc_attach"], transport=v["transport"],
                          decoder=v["decoder"], buffer_mib=v["buffer_mib"],
                          decap=v["decap"])


def _control(v: Mapping[str, Any]) -> ControlOptions:
    token = v.get("listen_token_file")
    pcap_dir = v.get("pcap_dir")
    return ControlOptions(listen=v.get("listen"),
                          listen_token_file=Path(token) if token else None,
                          pcap_dir=Path(pcap_dir) if pcap_dir else None)


def _replay(v: Mapping[str, Any]) -> ReplayOptions:
    from agent.replay.diff import DEFAULT_IGNORED
    from agent.replay.runner import Plan

    ignore = v.get("ignore_headers")
    plan = Plan(target=_required(v, "target", "target"), baseline=v["baseline"],
                connections=v["connections"], speed=v["speed"], max_wait=v["max_wait"],
                loop=v["loop"], duration=v["duration"], timeout=v["timeout"],
                pipeline=v["pipeline"], source_ports=v["source_ports"])
    return ReplayOptions(
        sources=tuple(v["sources"]), plan=plan, ports=tuple(dict.fromkeys(v["port"] or ())),
        ignore_headers=tuple(DEFAULT_IGNORED if ignore is None else ignore),
        report_json=v["report_json"], overwrite=v["overwrite"])


def _build(command: str, v: dict[str, Any], path: Path | None, shown: dict[str, Any],
           origins: dict[str, str], stray: tuple[str, ...]) -> Options:
    common: dict[str, Any] = dict(command=command, log_level=v["log_level"],
                                  log_format=v["log_format"], config_file=path,
                                  values=shown, origins=origins, stray_env=stray)
    if command == "inspect":
        return Options(**common, path=str(v["path"]), format=v["format"])
    if command == "probe":
        return Options(**common, path=v["path"], control=_control(v))
    if command == "replay":
        return Options(**common, replay=_replay(v))
    if command == "serve" and not v.get("pcap_dir"):
        raise OptionError("serve needs --pcap-dir: the directory POST /pcap may read from")
    capture = _capture(v) if command in ("run", "config") else None
    return Options(**common, pipeline=_pipeline(v), capture=capture, control=_control(v),
                   files=tuple(v.get("files") or ()))


def toml_lines(effective: Iterable[tuple[str, tuple[Any, str]]]) -> list[str]:
    """``key = value  # origin`` lines (TOML) for :meth:`Options.effective`: each one line
    that ``tomllib`` reads back to the same value (strings escaped; the origin in the comment
    too). A key whose value is None is shown commented out, and so is a value TOML cannot
    hold (text with a lone surrogate: a command-line byte that is not UTF-8)."""
    lines = []
    for key, (value, origin) in effective:
        where = _toml_text(origin)
        if value is None:
            lines.append(f"# {key} =  (not set)")
            continue
        try:
            lines.append(f"{key} = {_toml(value)}  # {where}")
        except UnicodeError:
            lines.append(f"# {key} = (not shown: not valid UTF-8, which TOML cannot hold)"
                         f"  # {where}")
    return lines


def _toml(value: Any) -> str:
    """``value`` as a TOML value; UnicodeError for text TOML cannot hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # TOML's forms too: 1e+100, inf, -inf, nan
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(x) for x in value) + "]"
    text = str(value)
    text.encode("utf-8")  # a lone surrogate raises: no TOML string holds it
    return f'"{_toml_text(text)}"'


#: The short escapes of a TOML basic string.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_text(text: str) -> str:
    """``text`` as the inside of a TOML basic string: quotes, backslashes, control characters
    and other characters that do not print (U+2028, a BOM, a lone surrogate) escaped;
    printable non-ASCII text kept as it is."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(_TOML_ESCAPES.get(c) or (c if c.isprintable() else
                                            f"\\u{ord(c):04X}" if ord(c) < 0x10000 else
                                            f"\\U{ord(c):08X}") for c in text)
