"""`python -m aurora_sweep.cli`: the same commands as `aurora-sweep`."""

from aurora_sweep.cli import app

app()
