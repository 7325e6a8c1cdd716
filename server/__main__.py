"""Entry point for `python -m server`. The guard matters: vLLM spawns worker processes that re-import it."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
