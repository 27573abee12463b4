"""mirror-agent: a passive TCP traffic mirror.

The packages read the pipeline in order: :mod:`agent.sources` (packets in: capture files,
eBPF, AF_PACKET) → :mod:`agent.decode` (frames → segments) → :mod:`agent.reassembly`
(segments → byte-exact chunks) → :mod:`agent.hooks` (inject, redact, select, rewrite) →
:mod:`agent.mirror` (the loop that drives them) → :mod:`agent.sinks` (forward, record,
NATS, per-flow pcaps); then the operations: :mod:`agent.metrics`, :mod:`agent.control`,
:mod:`agent.replay`, :mod:`agent.cli`.

The library in one import (names load on first use, so ``import agent`` stays cheap)::

    from agent import InjectHeader, MirrorConfig, OnlyToObserved, PcapFileSource, TrafficMirror
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.hooks import Hook, HookFunc, KeepAll, OnlyToObserved
    from agent.hooks.http import InjectHeader, RedactHeaders
    from agent.mirror.config import MirrorConfig
    from agent.mirror.driver import Cancelled, TrafficMirror
    from agent.model import Direction, FlowEnd, Segment, TrafficChunk
    from agent.reassembly import Reassembler, ReassemblyConfig
    from agent.sources.channel import ChannelSource
    from agent.sources.files.pcapfile import PcapFileSource

#: Each public name and the module that defines it.
_HOME = {
    "Cancelled": "agent.mirror.driver", "TrafficMirror": "agent.mirror.driver",
    "MirrorConfig": "agent.mirror.config",
    "Hook": "agent.hooks", "HookFunc": "agent.hooks", "KeepAll": "agent.hooks",
    "OnlyToObserved": "agent.hooks",
    "InjectHeader": "agent.hooks.http", "RedactHeaders": "agent.hooks.http",
    "Direction": "agent.model", "FlowEnd": "agent.model", "Segment": "agent.model",
    "TrafficChunk": "agent.model",
    "Reassembler": "agent.reassembly", "ReassemblyConfig": "agent.reassembly",
    "ChannelSource": "agent.sources.channel", "PcapFileSource": "agent.sources.files.pcapfile",
}

__all__ = ["Cancelled", "ChannelSource", "Direction", "FlowEnd", "Hook", "HookFunc",
           "InjectHeader", "KeepAll", "MirrorConfig", "OnlyToObserved", "PcapFileSource",
           "Reassembler", "ReassemblyConfig", "RedactHeaders", "Segment", "TrafficChunk",
           "TrafficMirror"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
