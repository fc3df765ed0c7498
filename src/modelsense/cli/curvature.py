"""`modelsense spectrum`, `modelsense perturb`, `modelsense effdim width-sweep | grid | blr`.

    modelsense spectrum --dataset digits --model mlp --k 20 --out runs/spectrum
    modelsense spectrum --dataset digits --trace-samples 100 --density-probes 5 --out runs/spectrum_full
    modelsense spectrum --dataset digits --use-test --out runs/spectrum_test   # the test-set Hessian
    modelsense spectrum --save-vectors --out runs/spectrum                     # keep the eigenvectors, then
    modelsense perturb --checkpoint runs/spectrum/model.pt --vectors runs/spectrum --out runs/perturb
    modelsense effdim width-sweep --out runs/width_sweep            # the prototype's sweep on digits
    modelsense effdim width-sweep --model resnet18 --widths 1,2,4,8,16,32,64 --dataset cifar10 --device cuda
    modelsense effdim grid --widths 4,8,16,32 --depths 1,2,3 --out runs/grid
    modelsense effdim grid --model cnn --widths 4,8,16,32,64 --depths 0,1,2,3,4,5,6,7,8 --dataset cifar10 --device cuda
    modelsense effdim blr --out runs/blr

Matrices are of the training loss summed over the examples unless `--reduction mean`; s is on the
scale of that matrix (default 100 for the summed loss, 100 / N for the mean): see
`modelsense.experiments.curvature`.
"""

from __future__ import annotations

import typer

from modelsense.cli.app import app
from modelsense.cli.generate import add_command
from modelsense.experiments.curvature import BLR, GRID, PERTURB, SPECTRUM, WIDTH_SWEEP

effdim_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Effective dimensionality N_eff = Σ λ/(λ + s): width sweeps, width x depth grids and Bayesian "
    "linear regression.",
)
app.add_typer(effdim_app, name="effdim")

add_command(app, SPECTRUM)
add_command(app, PERTURB)
add_command(effdim_app, WIDTH_SWEEP)
add_command(effdim_app, GRID)
add_command(effdim_app, BLR)
