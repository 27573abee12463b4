"""Replaying recorded traffic to a target (``mirror-agent replay``), by stage:

- :mod:`.sources`: recordings (native, JSON lines) and pcap/pcapng captures as readers of
  recorded records (:class:`~.sources.SourceReader`, where a NATS stream would plug in);
- :mod:`.assemble`: records → connections as they are read (:mod:`.conns`: a connection,
  its client bytes in bursts, its requests and the recorded (production) responses; the
  memory window), the recorded time → when it is due;
- :mod:`.feed`: the sources read while they replay, within a bounded memory; what does not
  fit waits on disk (:mod:`.spill`);
- :mod:`.http`: HTTP/1.x request and response framing, sans I/O;
- :mod:`.runner` and :mod:`.driver`: pacing, concurrency, one connection to the target per
  recorded connection;
- :mod:`.diff`: responses compared with production (and a baseline, Diffy-style), each
  request as soon as its responses are in;
- :mod:`.report`: counters, progress line and the final report.

The command itself is :mod:`agent.cli.replay`.
"""
