"""The soak's human summary: resource trends, requests per class, the books, each check."""

from __future__ import annotations

from typing import Any

__all__ = ["summary"]


def _num(v: Any) -> str:
    """A count with thousands separators."""
    return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def summary(r: dict[str, Any]) -> str:
    """The human table: trends, traffic, books, checks."""
    lines = [f"soak: {r['args']['duration']} s of load, {r['elapsed_s']} s in all, agent exit "
             f"{r['agent_exit']}", "",
             f"{'':12}{'idle':>9}{'start':>9}{'mid':>9}{'end':>9}{'quiet':>9}"
             f"{'slope/min (late)':>22}"]
    for f, unit in (("rss_mib", "RSS MiB"), ("anon_mib", "anon MiB"), ("fds", "fds"),
                    ("fds_net", "fds-in fl."), ("fds_other", "non-socket"),
                    ("threads", "threads")):
        t = r["trends"][f]
        lines.append(f"{unit:12}{r['idle'][f]:9.1f}{t['start']:9.1f}{t['mid']:9.1f}"
                     f"{t['end']:9.1f}{r['quiet'][f]:9.1f}{t['slope_per_min']:+22.3f}")
    lines += ["", f"{'requests':14}{'sent':>11}{'client ok':>11}{'service':>11}"
              f"{'shadow':>11}{'recorded':>11}"]
    for cls, c in r["clients"].items():
        lines.append(f"{cls:14}{_num(c['sent']):>11}{_num(c['ok']):>11}"
                     f"{_num(r['service'][cls]):>11}{_num(r['shadow'][cls]):>11}"
                     f"{_num(r['recorded'][cls]):>11}")
    for sink in ("forward", "record"):
        b = r[sink]
        lines.append(f"{sink} books: connections {_num(b['connections'])} = completed "
                     f"{_num(b['completed'])} + dropped {_num(b['dropped'])} "
                     f"{b['dropped_by_reason'] or ''} + in flight {_num(b['in_flight'])}")
    rec, m, cap = r["recording"], r["machine"], r["capture"]
    lines.append("capture: " + ", ".join(
        f"{k.removesuffix('_total')} {v:,.3g}" if isinstance(v, float) and not v.is_integer()
        else f"{k.removesuffix('_total')} {v:,.0f}" for k, v in cap.items()
        if k != "memory_rss_peak_bytes") + f"; peak RSS "
        f"{cap['memory_rss_peak_bytes'] / (1 << 20):.1f} MiB (the agent's own reading)")
    lines.append(f"agent CPU {m['agent_cpu_per_s']:.2f} core over the load; machine load "
                 f"average median {m['loadavg_median']:.2f}, max {m['loadavg_max']:.2f} "
                 f"({m['cpus']} CPUs)")
    lines.append(f"recording: {len(rec['files'])} files, {rec['records']:,} records, "
                 f"{sum(f['bytes'] for f in rec['files']) / (1 << 20):.1f} MiB")
    lines += ["", *(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}"
                    for c in r["checks"])]
    lines.append(f"\nsoak: {'PASS' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)
