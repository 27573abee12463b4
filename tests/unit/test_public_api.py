"""The library's public names (``agent/__init__.py``): each resolves to its defining module's
object, ``import agent`` alone loads nothing else, and the README's example runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import agent

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", agent.__all__)
def test_each_public_name_is_its_modules_object(name: str) -> None:
    home = importlib.import_module(agent._HOME[name])
    assert getattr(agent, name) is getattr(home, name)


def test_all_and_the_table_agree_and_unknown_names_raise() -> None:
    assert sorted(agent._HOME) == agent.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        agent.Nope  # noqa: B018


def test_importing_the_package_loads_no_stage() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, agent; "
                          "print(sorted(m for m in sys.modules if m.startswith('agent')))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['agent']"


def test_the_readme_library_example_runs(tmp_path: Path) -> None:
    """The README's example, with the bundled capture and no target (record only)."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"### Library\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    example = code.group(1).replace('"127.0.0.1:18080"', '""').replace(
        'Path("cap.pcap")', f'Path({str(Path(agent.__file__).parent / "data" / "demo.pcap")!r})')
    subprocess.run([sys.executable, "-c", example], cwd=tmp_path, check=True, timeout=60)
    assert (tmp_path / "rec.bin").stat().st_size > 0
