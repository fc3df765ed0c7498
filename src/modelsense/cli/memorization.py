"""`modelsense memorization`: held-out subsample estimates (Feldman & Zhang), local or on Ray; `modelsense verify`:
restore a checkpoint and check its accuracy."""

from __future__ import annotations

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.memorization import MEMORIZATION, VERIFY

add_command(app, MEMORIZATION)
add_command(app, VERIFY)
