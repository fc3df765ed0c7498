"""`modelsense spectrum`, `modelsense effdim width-sweep`, `modelsense effdim blr`.

    modelsense spectrum --dataset digits --model mlp --k 20 --out runs/spectrum
    modelsense spectrum --dataset digits --trace-samples 100 --density-probes 5 --out runs/spectrum_full
    modelsense effdim width-sweep --out runs/width_sweep            # the prototype's sweep on digits
    modelsense effdim width-sweep --model resnet18 --widths 1,2,4,8,16,32,64 --dataset cifar10 --device cuda
    modelsense effdim blr --out runs/blr

Matrices are of the training loss summed over the examples unless `--reduction mean`; s is on the
scale of that matrix (default 100 for the summed loss, 100 / N for the mean): see
`modelsense.experiments.curvature`.
"""

from __future__ import annotations

import typer

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.curvature import BLR, SPECTRUM, WIDTH_SWEEP

effdim_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="Effective dimensionality N_eff = Σ λ/(λ + s): width sweeps and Bayesian linear regression.")
app.add_typer(effdim_app, name="effdim")

add_command(app, SPECTRUM)
add_command(effdim_app, WIDTH_SWEEP)
add_command(effdim_app, BLR)
