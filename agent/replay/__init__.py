"""Replaying recorded traffic to a target (``mirror-agent replay``), by stage:

- :mod:`.sources`: recordings (native, JSON lines) and pcap/pcapng captures as readers of
  recorded records (:class:`~.sources.SourceReader`, where a NATS stream would plug in);
- :mod:`.conns`: records → connections, their client bytes in bursts, their requests and
  the recorded (production) responses;
- :mod:`.http`: HTTP/1.x request and response framing, sans I/O;
- :mod:`.runner` and :mod:`.driver`: pacing, concurrency, one connection to the target per
  recorded connection;
- :mod:`.diff`: responses compared with production (and a baseline, Diffy-style);
- :mod:`.report`: counters, progress line and the final report.

The command itself is :mod:`agent.cli_replay`.
"""
