"""TCP reassembly: :class:`~agent.model.Segment` objects in, byte-exact chunks, direction
ends and flow ends out. Pure: no I/O, no clock of its own, one thread.

- :mod:`.table`: :class:`Reassembler`, the flow table (open, reuse, RST, idle, limits, end)
  and the feeding loop with the in-order fast path;
- :mod:`.datapath`: :class:`~.datapath.DataPath`, a segment's bytes through its half into
  chunks, the memory limits and hole clocks;
- :mod:`.stream`: :class:`~.stream.StreamBuffer`, one direction's bytes ordered by position;
- :mod:`.flow`: what is kept per connection, and :class:`ReassemblyStats`;
- :mod:`.refusal`: new connections refused whole while the memory guard sheds.
"""

from agent.reassembly.flow import Output, ReassemblyStats
from agent.reassembly.table import HOLE_TIMEOUT, Reassembler, ReassemblyConfig

__all__ = ["HOLE_TIMEOUT", "Output", "Reassembler", "ReassemblyConfig", "ReassemblyStats"]
