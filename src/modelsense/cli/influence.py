"""Influence commands: `noisy-labels`, `prune`, `lds`, `influence` (methods: modelsense.attribution).

Each trains the model, or scores a trained one with `--checkpoint RUN/model.pt` (a run of
`modelsense train`; TracIn then reads the run's checkpoint_epoch_*.pt, saved with --checkpoint-epochs).
The method settings (--num-ens ... --memory-gb) are one option group (`options.method_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.data import DataConfig
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig

NOISY = {"lr": 0.1, "epochs": 200, "bs": 64, "delta": 1.0}  # memorises 10% noise on digits (MLP)
CLEAN = {"lr": 0.1, "epochs": 50, "bs": 64, "delta": 1.0}  # 100% train accuracy on clean digits

Methods = Annotated[str, typer.Option("--methods", help="comma-separated attribution methods (see `modelsense influence --help`)")]


def _print(metrics: dict[str, Any], keys: tuple[str, ...], out: Path) -> None:
    from rich.table import Table

    methods = list(metrics[keys[0]])
    table = Table("method", *keys)
    for m in methods:
        table.add_row(m, *(f"{metrics[k][m]:.4g}" if isinstance(metrics[k].get(m), float) else str(metrics[k].get(m)) for k in keys))
    console.print(table)
    console.print(f"-> {out}")


@app.command("noisy-labels")
@o.with_configs(corruption_ratio=0.1, **NOISY)
def noisy_labels(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, settings: dict[str, Any],
    methods: Methods = "gex,loss,grad-dot,el2n,randproj,tracin-rp,if-ekfac,mpe",
    checkpoint: o.Checkpoint = None,
    out: o.Out = Path("runs/noisy_labels"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Noisy-label detection: rank training examples by each method's self-influence; AUC/AP, histograms."""
    from modelsense.experiments.influence import run_noisy_labels

    set_quiet(quiet)
    metrics = run_noisy_labels(data_cfg, model_cfg, train_cfg, out, methods=methods, settings=settings,
                               checkpoint=checkpoint, progress=not quiet, overwrite=overwrite)
    console.print(f"train accuracy {metrics['train_accuracy']:.4f}, {metrics['n_corrupted']} corrupted labels")
    _print(metrics, ("auc", "auc_se", "ap", "ap_se", "seconds"), out)


@app.command()
@o.with_configs(**NOISY)
def prune(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, settings: dict[str, Any],
    methods: Methods = "gex,loss,el2n",
    ks: Annotated[str, typer.Option("--ks", help="comma-separated numbers of examples to remove (default 10-40% of N)")] = "",
    remove: Annotated[str, typer.Option("--remove", help="lowest (as Kim et al. 2023, GEX) or highest self-influence first")] = "lowest",
    n_random: Annotated[int, typer.Option("--n-random", help="random-removal repeats per k")] = 3,
    checkpoint: o.Checkpoint = None,
    out: o.Out = Path("runs/prune"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Dataset pruning: remove the k lowest self-influence examples, retrain, test accuracy vs random removal."""
    from modelsense.experiments.influence import run_prune

    set_quiet(quiet)
    metrics = run_prune(data_cfg, model_cfg, train_cfg, out, methods=methods, ks=o.int_list(ks, "--ks"), remove=remove,
                        n_random=n_random, settings=settings, checkpoint=checkpoint, progress=not quiet,
                        overwrite=overwrite)
    console.print(f"k = {metrics['ks']}; all data: {metrics['full_test_accuracy']:.4f}")
    for m, acc in {**metrics["accuracy"], "random": metrics["random_accuracy"]}.items():
        console.print(f"{m:>12s}: " + " ".join(f"{a:.4f}" for a in acc))
    console.print(f"-> {out}")


@app.command()
@o.with_configs(**CLEAN)
def lds(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, settings: dict[str, Any],
    methods: Methods = "grad-dot,randproj,tracin,if-ekfac,if-kfac,arnoldi,trak,gex",
    n_models: Annotated[int, typer.Option("--n-models", help="models trained on random subsets (ground truth)")] = 50,
    alpha: Annotated[float, typer.Option("--alpha", help="fraction of the training set in each subset")] = 0.5,
    n_test: Annotated[Optional[int], typer.Option("--n-test", help="first n test examples (default all)")] = None,
    chunk_models: Annotated[Optional[int], typer.Option("--chunk-models", help="subset models trained together (vmapped)")] = None,
    checkpoint: o.Checkpoint = None,
    out: o.Out = Path("runs/lds"), resume: o.Resume = False, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Linear datamodeling score per method (ground truth: models on random α-subsets, kept in --out for --resume)."""
    from modelsense.experiments.influence import run_lds

    set_quiet(quiet)
    metrics = run_lds(data_cfg, model_cfg, train_cfg, out, methods=methods, n_models=n_models, alpha=alpha, n_test=n_test,
                      chunk_models=chunk_models, settings=settings, checkpoint=checkpoint, progress=not quiet,
                      resume=resume, overwrite=overwrite)
    _print(metrics, ("lds", "lds_se", "seconds"), out)


@app.command()
@o.with_configs(**CLEAN)
def influence(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, settings: dict[str, Any],
    method: Annotated[str, typer.Option("--method", help="grad-dot, grad-cos, randproj, tracin, tracin-rp, if-explicit, "
                                        "if-cg, if-lissa, if-kfac, if-ekfac, arnoldi, gex, la-kfac, trak, el2n, loss, mpe")] = "if-ekfac",
    self_only: Annotated[bool, typer.Option("--self", help="self-influence only (N,) instead of the (N, n_test) matrix")] = False,
    n_test: Annotated[Optional[int], typer.Option("--n-test", help="first n test examples (default all)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="most helpful / harmful training examples shown per test example")] = 5,
    checkpoint: o.Checkpoint = None,
    out: o.Out = Path("runs/influence"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """One method's influence scores (score(i, j) ≈ rise of test loss j when training example i is removed)."""
    from modelsense.experiments.influence import run_influence

    set_quiet(quiet)
    metrics = run_influence(data_cfg, model_cfg, train_cfg, out, method=method, self_only=self_only, n_test=n_test,
                            top_k=top_k, settings=settings, checkpoint=checkpoint, progress=not quiet,
                            overwrite=overwrite)
    console.print(f"{metrics['method']}: scores of shape {metrics['shape']} in {metrics['seconds']:.1f}s -> {out}")
