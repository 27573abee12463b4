"""The control server: metrics, health, readiness, status, observed ports and capture files
submitted at run time (``POST /pcap``).

- :mod:`agent.control.api`: the routes, sans I/O (:class:`Api`, the :class:`Agent` protocol
  the running agent implements);
- :mod:`agent.control.server`: :class:`ControlServer`, the HTTP server over an :class:`Api`
  (an asyncio loop in its own thread), with :mod:`~agent.control.conn` (one connection),
  :mod:`~agent.control.http1` (heads and answers, sans I/O), :mod:`~agent.control.admission`
  (per-address and global caps) and :mod:`~agent.control.workers` (the slow routes' threads);
- :mod:`agent.control.ingest`: :class:`PcapIngest`, the job queue and the live source it
  feeds the mirror;
- :mod:`agent.control.merge`: :class:`MergedSource` (a live capture plus the ingest) and
  :class:`Beating` (a source that beats a heartbeat).
"""

from agent.control.api import Agent, AgentStatus, Api, State
from agent.control.ingest import PcapIngest
from agent.control.merge import Beating, MergedSource
from agent.control.server import ControlServer, is_loopback, parse_listen, read_token

__all__ = ["Agent", "AgentStatus", "Api", "Beating", "ControlServer", "MergedSource",
           "PcapIngest", "State", "is_loopback", "parse_listen", "read_token"]
