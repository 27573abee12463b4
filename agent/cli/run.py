"""Running the pipeline for the command line: the outputs opened (or refused, exit 2) before
the source starts, the mirror run with SIGINT/SIGTERM as cancellation, and on every way out
the summary (once the run started) and the exit status.

Order at the end: the mirror's run closes its writers (a background writer's thread is
stopped and joined), then :meth:`RunOutputs.finish` closes the files. A run that fails
before it starts leaves no file it created behind.

The first SIGINT/SIGTERM stops the run gracefully: buffered data goes through hooks and sinks,
and the forward sink waits (up to its ``close_timeout``) for the shadow to take what is
queued. A further signal while it waits stops the waiting at once: what the shadow had not
taken is dropped (a warning says so), the recording is still flushed, and the status is the
interrupted one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from agent.cli.options import Options
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import Cancelled, TrafficMirror
from agent.sources import PacketSource

if TYPE_CHECKING:
    from agent.cli.control import Control
from agent.cli.outputs import EXIT_DEGRADED, RunOutputs

__all__ = ["run_pipeline"]

log = structlog.get_logger("agent.cli.commands")


def run_pipeline(opts: Options, config: MirrorConfig,
                 make_source: Callable[[], PacketSource | None], interrupted_status: int,
                 control: Control | None = None) -> int:
    """Open the outputs of ``opts``, build the mirror of ``config`` and run it over the
    source ``make_source`` makes.

    Returns ``interrupted_status`` after a signal, else 0, or 3 if the run was degraded.
    Output paths are checked (:class:`~agent.cli.outputs.OutputError`, exit 2) before the source
    is made; if that fails, the files are closed and removed and the error goes up. Once the
    source exists, the summary (and ``--stats-json``) comes out on every way out, before an
    error goes up. With ``control`` (``--listen``), the control API serves from the moment the
    mirror exists until the run ends, and ``make_source`` may return None (``serve``: the
    pcap ingest is the only source).
    """
    p = opts.pipe
    outputs = RunOutputs(p.record, p.stats_json, p.overwrite, inputs=opts.files,
                         record_files=p.record_files, nats_auth=p.nats_auth)
    try:
        config.writer = outputs.record
        mirror = TrafficMirror(config)
        mirror.guard_memory()  # RSS held under the budget's limit (agent/mirror/memory_guard.py)
        if control is not None:
            control.start(mirror)
        made = make_source()
        source = control.source(made) if control is not None else made
        assert source is not None, "only a run with a control API has no source of its own"
    except BaseException:
        if control is not None:
            control.close()
        outputs.finish(None, failed=True)
        raise
    try:
        status = _run_until_stopped(mirror, source, p.stats_interval, interrupted_status,
                                    control)
    except BaseException:
        outputs.finish(mirror.stats(), failed=True)
        raise
    finally:
        if control is not None:
            control.close()
    degraded = outputs.finish(mirror.stats())
    return EXIT_DEGRADED if degraded and status == 0 else status


def _run_until_stopped(mirror: TrafficMirror, source: PacketSource, stats_interval: float,
                       interrupted_status: int, control: Control | None) -> int:
    """``mirror.run`` with SIGINT/SIGTERM as cancellation; 0, or ``interrupted_status`` once
    a signal came (see the module docstring)."""
    cancel = threading.Event()
    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopped_by.append(signal.Signals(signum).name)
        cancel.set()
        if control is not None:
            control.stopping()
        if not mirror.config.target_addr:
            return
        if len(stopped_by) == 1:
            log.info("stopping: waiting up to "
                     f"{mirror.config.forward.close_timeout:g} s for the shadow to take what "
                     "is queued; signal again to stop waiting", signal=stopped_by[0])
            return
        log.warning("stopped waiting for the shadow: what it had not taken is dropped "
                    "(counted as shutdown)", signal=stopped_by[-1])
        mirror.stop_waiting()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        mirror.run(source, cancel, stats_interval=stats_interval)
    except Cancelled:
        log.info("stopped; buffered data flushed", signal=stopped_by[0] if stopped_by else "")
        return interrupted_status
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return interrupted_status if stopped_by else 0
