"""The mirror: the loop that runs a packet source through reassembly, hooks and sinks.

- :mod:`.driver`: :class:`~.driver.TrafficMirror`, the loop (threads, sinks, shutdown);
- :mod:`.step`: :class:`~.step.MirrorStep`, sans I/O: segments in, sink commands out;
- :mod:`.handoff`: the one bounded hand-off between the capture and mirror threads;
- :mod:`.config`: :class:`~.config.MirrorConfig`, what the library runs with;
- :mod:`.budget` and :mod:`.memory_guard`: the memory bound, by arithmetic and by measure;
- :mod:`.heartbeat` and :mod:`.lograte`: liveness for ``/healthz``, rate-limited warnings.
"""
