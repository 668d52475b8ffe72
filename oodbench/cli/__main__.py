"""`python -m oodbench.cli ARGS`: the `oodbench` console script."""

import sys

from oodbench.cli import main

sys.exit(main())
