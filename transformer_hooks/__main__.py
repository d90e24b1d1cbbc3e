"""``python -m transformer_hooks``: the command line (see the cli package)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
