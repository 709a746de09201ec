"""``python -m cpconv``: the same as the ``cpconv`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
