"""Another datapath program on the agent's hooks: counts data packets, returns a set verdict.

Tests use it to check that the agent never blinds, replaces or removes someone else's program
and is not blinded by it. Run inside a namespace::

    python -m lab.counter IFACE tcx|clsact:PRIO|xdp VERDICT

It loads a program (bcc) that counts packets longer than 100 bytes (data, not bare
ACK/SYN/FIN) and returns VERDICT (-1 "next", 0 "ok/pass"), attaches it (a TCX link appended
after the programs already there, a clsact filter at PRIO, or XDP by netlink), prints
``ready``, then prints the count for every line read on stdin, and detaches on EOF.

``python -m lab.counter --query IFACE`` prints what is attached: TCX program ids on
ingress and egress, and the XDP program id (JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from pyroute2 import IPRoute

from agent.sources.ebpf.attach import xdp_prog_id
from agent.sources.ebpf.bpfsys import BPF_TCX_EGRESS, BPF_TCX_INGRESS, link_create, prog_ids
from lab.netns import NetNS

_SOURCE = """
BPF_ARRAY(hits, u64, 1);
static __always_inline void bump(u32 len) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v && len > 100)
        __sync_fetch_and_add(v, 1);
}
int count_tc(struct __sk_buff *skb) { bump(skb->len); return VERDICT; }
int count_xdp(struct xdp_md *x) { bump(x->data_end - x->data); return XDP_PASS; }
"""


class CountingProgram:
    """This module run in ``ns`` as a child: ``count()`` reads its counter, ``stop()``
    detaches it and returns the last count."""

    def __init__(self, ns: NetNS, ifname: str, where: str, verdict: int) -> None:
        self.proc = ns.popen(sys.executable, "-m", "lab.counter", ifname, where,
                             str(verdict), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if line.strip() != "ready":
            raise RuntimeError(f"counting program did not start: {line}"
                               f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}")

    def count(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> int:
        last = self.count()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(10) != 0:
            raise RuntimeError("counting program failed to detach")
        return last


def attached(ns: NetNS, ifname: str) -> dict[str, object]:
    """:func:`query` run inside ``ns``."""
    out = ns.run(sys.executable, "-m", "lab.counter", "--query", ifname).stdout
    result: dict[str, object] = json.loads(out)
    return result


def query(ifname: str) -> dict[str, object]:
    """TCX program ids per hook and the XDP program id (0: none) of ``ifname``."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        xdp_id = xdp_prog_id(ipr, idx)
    return {"ingress": prog_ids(idx, BPF_TCX_INGRESS), "egress": prog_ids(idx, BPF_TCX_EGRESS),
            "xdp": xdp_id}


def main(argv: list[str]) -> int:
    if argv[0] == "--query":
        print(json.dumps(query(argv[1])))
        return 0
    from bcc import BPF

    ifname, where, verdict = argv[0], argv[1], int(argv[2])
    bpf = BPF(text=_SOURCE.replace("VERDICT", str(verdict)))
    hits = bpf[b"hits"]
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        detach = _attach(bpf, ipr, idx, where)
        print("ready", flush=True)
        for _line in sys.stdin:
            print(int(hits[hits.Key(0)].value), flush=True)
        detach()
    return 0


def _attach(bpf: object, ipr: IPRoute, idx: int, where: str) -> Callable[[], object]:
    from bcc import BPF

    if where == "xdp":
        fd = bpf.load_func(b"count_xdp", BPF.XDP).fd  # type: ignore[attr-defined]
        ipr.link("set", index=idx, xdp_fd=fd, xdp_flags=1 << 1)
        return lambda: ipr.link("set", index=idx, xdp_fd=-1, xdp_flags=1 << 1)
    fd = bpf.load_func(b"count_tc", BPF.SCHED_CLS).fd  # type: ignore[attr-defined]
    if where == "tcx":
        link = link_create(fd, idx, BPF_TCX_INGRESS)
        return lambda: os.close(link)
    prio = int(where.partition(":")[2])
    if "clsact" not in [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(idx)]:
        ipr.tc("add", "clsact", index=idx)
    ipr.tc("add-filter", "bpf", index=idx, handle=1, fd=fd, name="counter",
           parent=0xFFFFFFF2, classid=1, direct_action=True, prio=prio)
    return lambda: ipr.tc("del-filter", "bpf", index=idx, handle=1, parent=0xFFFFFFF2,
                          prio=prio)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
