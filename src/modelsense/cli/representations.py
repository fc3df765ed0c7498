"""`modelsense zoo`, `modelsense compare`, `modelsense stitch`: representations and their symmetries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.data import DataConfig
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig

ModelA = Annotated[Optional[Path], typer.Option("--model-a", help="checkpoint of model A (model.pt of `modelsense train`, or zoo/model_<seed>.pt)")]
ModelB = Annotated[Optional[Path], typer.Option("--model-b", help="checkpoint of model B")]
SeedA = Annotated[Optional[int], typer.Option("--seed-a", help="model A = the zoo member with this seed (trained into --zoo if missing); default --seed")]
SeedB = Annotated[Optional[int], typer.Option("--seed-b", help="model B = the zoo member with this seed; default --seed + 1")]
Zoo = Annotated[Optional[Path], typer.Option("--zoo", help="zoo run directory holding zoo/model_<seed>.pt (default: --out)")]
Layers = Annotated[str, typer.Option("--layers", help="'all' (every nn.ReLU module) or comma-separated module names, e.g. act1,act2")]


@app.command()
@o.with_configs()
def zoo(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    n_models: Annotated[int, typer.Option("--n-models", help="number of models (seeds --seed, --seed + 1, ...)")] = 8,
    seeds: Annotated[str, typer.Option("--seeds", help="explicit comma-separated seeds (overrides --n-models)")] = "",
    method: Annotated[str, typer.Option("--method", help="auto (vmapped engine unless batch norm / ivon), ensemble or fit")] = "auto",
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="models trained together (vmapped) per chunk")] = None,
    out: o.Out = Path("runs/zoo"), resume: o.Resume = False, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Train N models of one architecture from different seeds (a model zoo), reused by compare and stitch."""
    from modelsense.experiments.representations import run_zoo

    set_quiet(quiet)
    seed_list = o.int_list(seeds, "--seeds") or None
    metrics = run_zoo(data_cfg, model_cfg, train_cfg, out, n_models=n_models, seeds=seed_list, method=method,
                      chunk_models=chunk_size, progress=not quiet, resume=resume, overwrite=overwrite)
    console.print(f"{len(metrics['seeds'])} models ({metrics['n_trained']} trained, {metrics['method']}): test accuracy "
                  f"{metrics['mean_test_accuracy']:.4f} ± {metrics['std_test_accuracy']:.4f}  -> {out}")


@app.command()
@o.with_configs()
def compare(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    model_a: ModelA = None, model_b: ModelB = None, seed_a: SeedA = None, seed_b: SeedB = None,
    metric: Annotated[str, typer.Option("--metric", help="cka, unbiased-cka, rbf-cka, procrustes, relu-procrustes or relu-cka (all reported as similarities)")] = "cka",
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", help="use a seeded random subset of this many test examples (n x n kernels)")] = None,
    layers: Layers = "all",
    zoo: Zoo = None,
    out: o.Out = Path("runs/compare"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Layer x layer similarity of two models' representations on the test set, with a heatmap."""
    from modelsense.experiments.representations import METRIC_NOTES, run_compare

    set_quiet(quiet)
    metrics = run_compare(data_cfg, model_cfg, train_cfg, out, model_a=model_a, model_b=model_b, seed_a=seed_a,
                          seed_b=seed_b, metric=metric, n_examples=n_examples, layers=layers, zoo=zoo,
                          progress=not quiet, overwrite=overwrite)
    diag = " ".join(f"{layer}={v:.4f}" for layer, v in zip(metrics["layers"], metrics["diagonal"]))
    console.print(f"{metrics['metric']} (similarity) diagonal: {diag}  -> {out}")
    if metrics["metric"] in METRIC_NOTES:
        console.print(METRIC_NOTES[metrics["metric"]], style="dim")


@app.command()
@o.with_configs()
def stitch(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    kind: Annotated[str, typer.Option("--kind", help="linear, birkhoff, permutation, lowrank, lasso, or a comma list of them")] = "linear",
    projection: Annotated[str, typer.Option("--projection", help="Birkhoff projection after each step: sinkhorn (as Godfrey et al. 2022) or exact")] = "sinkhorn",
    layers: Layers = "all",
    model_a: ModelA = None, model_b: ModelB = None, seed_a: SeedA = None, seed_b: SeedB = None,
    stitch_epochs: Annotated[int, typer.Option("--stitch-epochs", help="epochs of stitching-layer training")] = 20,
    stitch_lr: Annotated[float, typer.Option("--stitch-lr", help="stitching learning rate")] = 1e-3,
    stitch_bs: Annotated[int, typer.Option("--stitch-bs", help="stitching minibatch size")] = 32,
    stitch_optimizer: Annotated[str, typer.Option("--stitch-optimizer", help="sgd (no momentum, as Godfrey et al. 2022) or adam")] = "sgd",
    alpha: Annotated[float, typer.Option("--alpha", help="weight of -alpha·||W||_F pushing Birkhoff layers towards permutations")] = 0.1,
    rank: Annotated[int, typer.Option("--rank", help="rank of lowrank stitching")] = 4,
    multiplier: Annotated[float, typer.Option("--multiplier", help="L1 multiplier of lasso stitching")] = 1e-3,
    init: Annotated[str, typer.Option("--init", help="default (random, as Godfrey et al. 2022) or match (closed form from activations)")] = "default",
    zoo: Zoo = None,
    out: o.Out = Path("runs/stitch"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Stitch model A into model B after each chosen ReLU layer; stitched accuracy and penalty per layer."""
    from modelsense.experiments.representations import run_stitch
    from modelsense.representations.stitching import StitchConfig

    set_quiet(quiet)
    cfg = StitchConfig(epochs=stitch_epochs, lr=stitch_lr, batch_size=stitch_bs, optimizer=stitch_optimizer,
                       alpha=alpha, rank=rank, lasso_multiplier=multiplier, projection=projection, init=init,
                       seed=train_cfg.seed, device=train_cfg.device)
    metrics = run_stitch(data_cfg, model_cfg, train_cfg, out, kinds=kind, stitch_cfg=cfg, layers=layers,
                         model_a=model_a, model_b=model_b, seed_a=seed_a, seed_b=seed_b, zoo=zoo, progress=not quiet,
                         overwrite=overwrite)
    console.print(f"clean accuracy A {metrics['clean_accuracy'][0]:.4f}  B {metrics['clean_accuracy'][1]:.4f}")
    for k in metrics["kinds"]:
        pen = metrics["by_kind"][k]["penalty"]
        console.print(f"{k:12s} penalty " + " ".join(f"{layer}={p:+.4f}" for layer, p in zip(metrics["layers"], pen)))
    console.print(f"-> {out}")
