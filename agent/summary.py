"""The end-of-run summary: every counter that says where bytes went, grouped for humans."""

from __future__ import annotations

__all__ = ["format_summary"]

_GROUPS = (
    ("capture", ("source_",)),
    ("reassembly", ("reassembly_",)),
    ("mirror", ("chunks", "records", "recorded_bytes", "forward_hook", "record_hook")),
    ("forward", ("forward_",)),
)


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
