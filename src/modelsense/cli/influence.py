"""Influence commands: `noisy-labels`, `prune`, `relabel`, `lds`, `influence` (methods: modelsense.attribution).

Each trains the model, or scores a trained one with `--checkpoint RUN/model.pt` (a run of
`modelsense train`; TracIn then reads the run's checkpoint_epoch_*.pt, saved with --checkpoint-epochs).
Options, defaults and help texts are the specs' (modelsense.experiments.influence).
"""

from __future__ import annotations

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.influence import INFLUENCE, LDS, NOISY_LABELS, PRUNE
from modelsense.experiments.relabel import RELABEL

for _command in (NOISY_LABELS, PRUNE, RELABEL, LDS, INFLUENCE):
    add_command(app, _command, _command.name)
