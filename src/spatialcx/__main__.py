"""``python -m spatialcx``: the ``spatialcx`` command."""

import sys

from spatialcx.cli import main

if __name__ == "__main__":
    sys.exit(main())
