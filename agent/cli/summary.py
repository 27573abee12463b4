"""The end-of-run summary: the registry's non-zero metrics grouped by stage for humans; and
whether the run was degraded (finished, but incomplete: exit status 3).

Both read a :func:`agent.metrics.snapshot` (``{'name{label="value"}': value}``). In the
summary a metric shows as ``<what>=<value>`` on its stage's line (``mirror_agent_<stage>_``
and ``_total`` dropped), a labelled one as ``<what>{<label value>}=<value>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.metrics import (
    FAMILIES,
    FORWARD_CONNECTIONS_DROPPED,
    FORWARD_REQUESTS_DROPPED,
    NATS_DROPPED,
    PREFIX,
    RECORD_CONNECTIONS_DROPPED,
    key,
    split_key,
    total,
)

__all__ = ["degradation", "format_summary"]

#: Stages in pipeline order (the word after ``mirror_agent_`` in a metric's name).
_STAGES = tuple(dict.fromkeys(f.stage for f in FAMILIES))
#: Stages whose line shows even when all of it is 0 (the others only matter for some sources).
_ALWAYS = ("source", "reassembly", "mirror", "forward", "record")

#: Metrics (name, labels) that make a finished run degraded, with what they mean.
_DEGRADED = (
    (key("mirror_agent_source_files_cut_short_total"), "{} capture file(s) cut short"),
    (key("mirror_agent_record_errors_total"), "{} recording(s) failed"),
    (key("mirror_agent_record_files_vanished_total"),
     "{} recording file(s) vanished while written"),
    (key("mirror_agent_record_records_lost_total", reason="queue_full"),
     "recording dropped {} record(s): the disk could not keep up"),
    (key("mirror_agent_record_records_lost_total", reason="memory"),
     "recording dropped {} record(s) near the memory limit"),
    (key("mirror_agent_reassembly_flows_refused_total", reason="memory"),
     "{} new connection(s) not mirrored near the memory limit"),
    (FORWARD_CONNECTIONS_DROPPED.name, "forward sink dropped {} shadow connection(s)"),
    (FORWARD_REQUESTS_DROPPED.name, "forward sink dropped {} request(s)"),
    (NATS_DROPPED.name, "NATS recording dropped {} record(s)"),
    (RECORD_CONNECTIONS_DROPPED.name, "recording dropped {} connection(s)"),
)
#: The memory guard's constant or momentary gauges (its peak and counters do show).
_MOMENT = tuple(PREFIX + n for n in ("memory_threshold_bytes", "memory_rss_bytes",
                                     "memory_rss_ratio", "memory_level"))
#: Labelled metrics among those: summed, and the phrase lists the reasons.
_BY_REASON = (FORWARD_CONNECTIONS_DROPPED.name, NATS_DROPPED.name,
              FORWARD_REQUESTS_DROPPED.name, RECORD_CONNECTIONS_DROPPED.name)


def _short(sample: str) -> tuple[str, str]:
    """(stage, what) of a sample: ``mirror_agent_forward_connections_dropped_total{reason="x"}``
    → ``("forward", "connections_dropped{x}")``."""
    name, labels = split_key(sample)
    stage, _, what = name.removeprefix(PREFIX).partition("_")
    what = what.removesuffix("_total")
    if labels:
        what += "{" + ",".join(labels.values()) + "}"
    return stage, what


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def format_summary(stats: Mapping[str, float]) -> str:
    """A few lines, one per stage, listing the non-zero metrics (``what=value``); the
    kernel, ring and drain lines only if one of theirs is non-zero. The memory budget and
    the hand-offs' fill are left out: constant or momentary, they are logged at start, in
    ``--stats-json`` and in the stats log."""
    by_stage: dict[str, list[str]] = {s: [] for s in _STAGES}
    for sample, v in stats.items():
        if not v:
            continue
        stage, what = _short(sample)
        if stage in ("budget", "handoff") or split_key(sample)[0] in _MOMENT:
            continue
        by_stage.setdefault(stage, []).append(f"{what}={_number(v)}")
    lines = ["mirror-agent summary:"]
    for stage, items in by_stage.items():
        if items or stage in _ALWAYS:
            lines.append(f"  {stage:<11} {' '.join(items) if items else '-'}")
    return "\n".join(lines) + "\n"


def degradation(stats: Mapping[str, float]) -> list[str]:
    """Why a run that finished is incomplete, one phrase per sink or source that lost data
    (the forward sink's with its reasons); empty if it is not."""
    out = []
    for sample, what in _DEGRADED:
        n = total(stats, sample) if sample in _BY_REASON else stats.get(sample, 0)
        if not n:
            continue
        phrase = what.format(_number(n))
        if sample in _BY_REASON:
            reasons = sorted(((v, split_key(k)[1].get("reason", "")) for k, v in stats.items()
                              if k.startswith(sample + "{") and v), key=lambda r: -r[0])
            if reasons:
                phrase += f" ({', '.join(f'{why}={_number(n)}' for n, why in reasons)})"
        out.append(phrase)
    return out
