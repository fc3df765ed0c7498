"""`modelsense mpe ...`: the five memory-perturbation experiments of Nickl et al. 2023 (flags of their scripts).

    modelsense mpe validation --n-retrain 200 --var-version kfac --out runs/mpe_val
    modelsense mpe loo-iterations --optimizer ivon --optim-var
    modelsense mpe loo-l2reg --n-exp 9 --deltas-start -1 --deltas-stop 3
    modelsense mpe evolving
    modelsense mpe loco

Defaults are the CPU settings on digits (`modelsense.experiments.mpe.DEFAULTS`); options, defaults and
help texts are the experiments' specs (`spec_class`); the MPE code's `--optimizer iblr` is `ivon`.
"""

from __future__ import annotations

import typer

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.mpe import COMMANDS

mpe_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Memory-perturbation equation: LOO estimates, sensitivities, the five experiments of Nickl et al. 2023.",
)
app.add_typer(mpe_app, name="mpe")

for _experiment, _command in COMMANDS.items():
    add_command(mpe_app, _command, _experiment)
