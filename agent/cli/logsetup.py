"""structlog set-up: JSON lines when stderr is not a terminal, readable console output when
it is. The library only logs through structlog; only the command line configures it."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


class _StderrLogger:
    """Writes each rendered event to whatever ``sys.stderr`` is at that moment."""

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: object) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Route structlog to stderr at ``level``; ``json=None`` picks by whether stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
