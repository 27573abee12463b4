"""The ``mirror-agent`` command: parsing (:mod:`.parser`, :mod:`.args`), flags > environment
> config file (:mod:`.layers`) into :class:`~.options.Options`, outputs and logs, and one
module per command (:mod:`.run`, :mod:`.control`, :mod:`.inspect`, :mod:`.replay`)."""

from agent.cli.commands import main

__all__ = ["main"]
