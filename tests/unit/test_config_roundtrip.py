"""``mirror-agent config`` prints TOML that reads back to the same values (issue 19): strings
with newlines, quotes, backslashes, control characters and non-ASCII text are escaped
(agent/cli/layers.py ``toml_lines``), and so is each value's origin in its comment; the
output saved to a file and given back with ``--config`` prints the same configuration."""

from __future__ import annotations

import contextlib
import io
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.cli.commands import main
from agent.cli.layers import toml_lines

#: Text with the characters TOML treats specially, and any other (no lone surrogates:
#: TOML, like UTF-8, cannot hold them; see the test for those below).
TEXT = st.text(st.characters(exclude_categories=["Cs"]))
SCALARS = st.one_of(TEXT, st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.one_of(SCALARS, st.lists(TEXT, max_size=4), st.lists(st.integers(0, 65535),
                                                                 max_size=4))
BASE = ["config", "--iface", "lo", "--port", "8080"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(type(a) is type(b) and a == b) or (
        isinstance(a, list | tuple) and isinstance(b, list) and len(a) == len(b)
        and all(_same(x, y) for x, y in zip(a, b, strict=True)))


@settings(max_examples=400, deadline=None)
@given(VALUES, TEXT)
@example("line one\nline two", "config /tmp/with\nnewline.toml")
@example('a "quoted" \\back\\slash\t\r\x00\x01\x1f\x7f\x80\u2028\ufeff é 😀', "flag")
@example("", "")
def test_every_value_reads_back_as_printed(value: Any, origin: str) -> None:
    lines = toml_lines([("some-key", (value, origin)), ("other", (None, "default"))])
    assert len(lines) == 2 and all("\n" not in line and "\r" not in line for line in lines)
    parsed = tomllib.loads("\n".join(lines) + "\n")
    assert list(parsed) == ["some-key"]
    assert _same(value, parsed["some-key"]), (value, parsed["some-key"])


def _config(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


VALUES_BY_FLAG = {
    "--record": ['multi\nline', 'q"uote and \\back\\slash', "ctl\x01\x1b[31m\x7f",
                 "tab\tcr\rlf", "é 😀 \u2028 \ufeff"],
    "--filter": ["tcp\nand port 8080"],
}


@pytest.mark.parametrize(("flag", "value"), [(f, v) for f, vs in VALUES_BY_FLAG.items()
                                             for v in vs])
def test_config_output_given_back_prints_the_same(tmp_path: Path, flag: str,
                                                  value: str) -> None:
    rc, first = _config([*BASE, f"{flag}={value}"])
    assert rc == 0
    key = flag.removeprefix("--")
    assert tomllib.loads(first)[key] == value
    saved = tmp_path / "odd\nname \"x\".toml"  # the origin comment names this path
    saved.write_text(first, encoding="utf-8")
    rc, second = _config(["config", "--config", str(saved)])
    assert rc == 0
    assert tomllib.loads(second) == tomllib.loads(first)
    saved.write_text(second, encoding="utf-8")
    rc, third = _config(["config", "--config", str(saved)])
    assert rc == 0 and third == second  # identical, origins included


def test_a_value_toml_cannot_hold_is_shown_commented_out(
        capsys: pytest.CaptureFixture[str]) -> None:
    # A lone surrogate: what Python makes of a command-line byte that is not UTF-8.
    lines = toml_lines([("record", ("/tmp/bad\udcff.bin", "flag"))])
    assert lines[0].startswith("# record = ") and "not valid UTF-8" in lines[0]
    assert tomllib.loads("\n".join(lines)) == {}
    lines[0].encode("utf-8")  # printable, whatever the terminal
