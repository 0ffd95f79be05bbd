"""`python -m hsiedge.cli`: the `hsiedge` command."""

import sys

from hsiedge.cli import app

sys.exit(app())
