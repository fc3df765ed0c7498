"""`modelsense zoo`, `compare`, `stitch`, `probe`: representations and their symmetries."""

from __future__ import annotations

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.representations import COMPARE, PROBE, STITCH, ZOO

add_command(app, ZOO)
add_command(app, COMPARE)
add_command(app, STITCH)
add_command(app, PROBE)
