"""``python -m launcher``: the same as the ``ftrun`` command (see :mod:`launcher.agent.cli`)."""

import sys

from launcher.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
