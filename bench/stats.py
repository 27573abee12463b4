"""Reading a run's ``--stats-json`` in a benchmark: a missing metric is an error, never 0."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from agent.metrics import key

__all__ = ["load", "metric"]


def load(path: Path) -> dict[str, float]:
    """The samples of a ``--stats-json`` file."""
    data: dict[str, float] = json.loads(path.read_text())
    return data


def metric(stats: Mapping[str, float], name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of ``stats``; KeyError naming every known sample if the
    run did not report it (a renamed or undeclared metric must not read as 0)."""
    k = key(name, **labels)
    if k not in stats:
        raise KeyError(f"{k} is not in the stats; known: {', '.join(sorted(stats))}")
    return stats[k]
