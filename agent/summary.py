"""The end-of-run summary: every counter that says where bytes went, grouped for humans; and
whether the run was degraded (finished, but incomplete: exit status 3)."""

from __future__ import annotations

__all__ = ["degradation", "format_summary"]

_GROUPS = (
    ("capture", ("source_",)),
    ("reassembly", ("reassembly_",)),
    ("mirror", ("chunks", "forward_hook", "record_hook", "mirror_")),
    ("record", ("records", "recorded_bytes", "record_")),
    ("forward", ("forward_",)),
)

#: Counters that make a finished run degraded, with what they mean.
_DEGRADED = (
    ("source_cut_short_files", "{} capture file(s) cut short"),
    ("record_errors", "{} recording(s) failed"),
    ("record_dropped_records", "recording dropped {} record(s): the disk could not keep up"),
    ("forward_flows_dropped", "forward sink dropped {} flow(s)"),
)
_FORWARD_REASON = "forward_flows_dropped_"


def format_summary(stats: dict[str, int]) -> str:
    """A few lines, one per stage, listing the non-zero counters (``name=value``)."""
    lines = ["mirror-agent summary:"]
    used: set[str] = set()
    for title, prefixes in _GROUPS:
        items = [(k, v) for k, v in stats.items() if k.startswith(prefixes) and k not in used]
        used.update(k for k, _ in items)
        shown = [f"{k.removeprefix(prefixes[0]) if len(prefixes) == 1 else k}={v}"
                 for k, v in items if v]
        lines.append(f"  {title:<11} {' '.join(shown) if shown else '-'}")
    rest = [f"{k}={v}" for k, v in stats.items() if k not in used and v]
    if rest:
        lines.append(f"  {'other':<11} {' '.join(rest)}")
    return "\n".join(lines) + "\n"


def degradation(stats: dict[str, int]) -> list[str]:
    """Why a run that finished is incomplete, one phrase per sink or source that lost data
    (the forward sink's with its reasons); empty if it is not."""
    out = []
    for key, what in _DEGRADED:
        if not stats.get(key):
            continue
        phrase = what.format(stats[key])
        if key == "forward_flows_dropped":
            reasons = sorted(((v, k.removeprefix(_FORWARD_REASON)) for k, v in stats.items()
                              if k.startswith(_FORWARD_REASON) and v), key=lambda r: -r[0])
            if reasons:
                phrase += f" ({', '.join(f'{why}={n}' for n, why in reasons)})"
        out.append(phrase)
    return out
