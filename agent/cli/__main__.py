"""``python -m agent.cli``: the ``mirror-agent`` command."""

import sys

from agent.cli.commands import main

sys.exit(main())
