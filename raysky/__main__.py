"""``python -m raysky``: the same command line as the ``raysky`` script, with its exit codes."""

import sys

from raysky.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
