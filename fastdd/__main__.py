"""``python -m fastdd``: the same command line as the ``fastdd`` entry point."""
import sys

from .cli import main

sys.exit(main())
