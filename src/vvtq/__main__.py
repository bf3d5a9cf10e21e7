"""``python -m vvtq`` (and ``torchrun -m vvtq``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
