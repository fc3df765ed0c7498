"""Influence commands: `noisy-labels`, `prune`, `lds`, `influence` (methods: modelsense.attribution)."""

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
NumEns = Annotated[Optional[int], typer.Option("--num-ens", help="ensemble members: gex fine-tuning runs, la-kfac samples")]
FtLr = Annotated[Optional[float], typer.Option("--ft-lr", help="gex: peak learning rate of each fine-tuning run")]
FtStep = Annotated[Optional[int], typer.Option("--ft-step", help="gex: SGD steps per fine-tuning run")]
FtLrSched = Annotated[Optional[str], typer.Option("--ft-lr-sched", help="gex: cosine (restarted, to 0) or constant (with clipping)")]
GexEps = Annotated[Optional[float], typer.Option("--gex-eps", help="gex/la-kfac: floor τ of the reference loss max(l(θ*), τ); 0 = none (original 0.05)")]
ProjDim = Annotated[Optional[int], typer.Option("--proj-dim", help="projection dimension of randproj, tracin-rp, trak")]
Damping = Annotated[Optional[float], typer.Option("--damping", help="if-*/trak/arnoldi damping (if-*/trak: relative to the mean eigenvalue)")]
DampingMode = Annotated[Optional[str], typer.Option("--damping-mode", help="relative (× mean eigenvalue) or absolute")]
Matrix = Annotated[Optional[str], typer.Option("--matrix", help="curvature of if-*/arnoldi: ggn, hessian or ef")]
Rank = Annotated[Optional[int], typer.Option("--arnoldi-rank", help="arnoldi: number of eigendirections")]
EnsModels = Annotated[Optional[int], typer.Option("--ensemble-models", help="trak and if-*: models trained from scratch whose scores are averaged (trak default 10, if-* 1 = the trained model only)")]
El2nRepeat = Annotated[Optional[int], typer.Option("--el2n-repeat", help="el2n: early-trained models")]
LossType = Annotated[str, typer.Option("--loss", help="cross_entropy (softmax) or sigmoid_bce (per-class sigmoid, the GEX original's default; gradient/ensemble methods only)")]
BsJacs = Annotated[Optional[int], typer.Option("--bs-jacs", help="examples per vmapped per-example gradient pass (default: as many as fit in memory-gb / 8)")]
MemoryBudget = Annotated[float, typer.Option("--memory-gb", help="memory budget in GiB: score matrices larger than this go to a memory-mapped file")]


def _settings(num_ens, ft_lr, ft_step, ft_lr_sched, gex_eps, proj_dim, damping, damping_mode, matrix, arnoldi_rank,
              ensemble_models, el2n_repeat, loss, bs_jacs, memory_gb) -> dict[str, Any]:
    return {"num_ens": num_ens, "ft_lr": ft_lr, "ft_step": ft_step, "ft_lr_sched": ft_lr_sched, "gex_eps": gex_eps,
            "proj_dim": proj_dim, "damping": damping, "damping_mode": damping_mode, "matrix": matrix, "rank": arnoldi_rank,
            "n_models": ensemble_models, "el2n_repeat": el2n_repeat, "loss": loss, "chunk_size": bs_jacs,
            "memory_budget": int(memory_gb * 2**30)}


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
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    methods: Methods = "gex,loss,grad-dot,el2n,randproj,tracin-rp,if-ekfac,mpe",
    num_ens: NumEns = None, ft_lr: FtLr = None, ft_step: FtStep = None, ft_lr_sched: FtLrSched = None, gex_eps: GexEps = None,
    proj_dim: ProjDim = None, damping: Damping = None, damping_mode: DampingMode = None, matrix: Matrix = None,
    arnoldi_rank: Rank = None, ensemble_models: EnsModels = None, el2n_repeat: El2nRepeat = None,
    loss: LossType = "cross_entropy", bs_jacs: BsJacs = None, memory_gb: MemoryBudget = 2.0,
    out: o.Out = Path("runs/noisy_labels"), quiet: o.Quiet = False,
) -> None:
    """Noisy-label detection: rank training examples by each method's self-influence; AUC/AP, histograms."""
    from modelsense.experiments.influence import run_noisy_labels

    set_quiet(quiet)
    metrics = run_noisy_labels(data_cfg, model_cfg, train_cfg, out, methods=methods, progress=not quiet, settings=_settings(
        num_ens, ft_lr, ft_step, ft_lr_sched, gex_eps, proj_dim, damping, damping_mode, matrix, arnoldi_rank, ensemble_models,
        el2n_repeat, loss, bs_jacs, memory_gb))
    console.print(f"train accuracy {metrics['train_accuracy']:.4f}, {metrics['n_corrupted']} corrupted labels")
    _print(metrics, ("auc", "ap", "seconds"), out)


@app.command()
@o.with_configs(**NOISY)
def prune(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    methods: Methods = "gex,loss,el2n",
    ks: Annotated[str, typer.Option("--ks", help="comma-separated numbers of examples to remove (default 10-40% of N)")] = "",
    remove: Annotated[str, typer.Option("--remove", help="lowest (the GEX paper) or highest self-influence first")] = "lowest",
    n_random: Annotated[int, typer.Option("--n-random", help="random-removal repeats per k")] = 3,
    num_ens: NumEns = None, ft_lr: FtLr = None, ft_step: FtStep = None, ft_lr_sched: FtLrSched = None, gex_eps: GexEps = None,
    proj_dim: ProjDim = None, damping: Damping = None, damping_mode: DampingMode = None, matrix: Matrix = None,
    arnoldi_rank: Rank = None, ensemble_models: EnsModels = None, el2n_repeat: El2nRepeat = None,
    loss: LossType = "cross_entropy", bs_jacs: BsJacs = None, memory_gb: MemoryBudget = 2.0,
    out: o.Out = Path("runs/prune"), quiet: o.Quiet = False,
) -> None:
    """Dataset pruning: remove the k lowest self-influence examples, retrain, test accuracy vs random removal."""
    from modelsense.experiments.influence import run_prune

    set_quiet(quiet)
    metrics = run_prune(data_cfg, model_cfg, train_cfg, out, methods=methods, ks=o.int_list(ks, "--ks"), remove=remove,
                        n_random=n_random, progress=not quiet, settings=_settings(
                            num_ens, ft_lr, ft_step, ft_lr_sched, gex_eps, proj_dim, damping, damping_mode, matrix,
                            arnoldi_rank, ensemble_models, el2n_repeat, loss, bs_jacs, memory_gb))
    console.print(f"k = {metrics['ks']}; all data: {metrics['full_test_accuracy']:.4f}")
    for m, acc in {**metrics["accuracy"], "random": metrics["random_accuracy"]}.items():
        console.print(f"{m:>12s}: " + " ".join(f"{a:.4f}" for a in acc))
    console.print(f"-> {out}")


@app.command()
@o.with_configs(**CLEAN)
def lds(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    methods: Methods = "grad-dot,randproj,tracin,if-ekfac,if-kfac,arnoldi,trak,gex",
    n_models: Annotated[int, typer.Option("--n-models", help="models trained on random subsets (ground truth)")] = 50,
    alpha: Annotated[float, typer.Option("--alpha", help="fraction of the training set in each subset")] = 0.5,
    n_test: Annotated[Optional[int], typer.Option("--n-test", help="first n test examples (default all)")] = None,
    chunk_models: Annotated[Optional[int], typer.Option("--chunk-models", help="subset models trained together (vmapped)")] = None,
    num_ens: NumEns = None, ft_lr: FtLr = None, ft_step: FtStep = None, ft_lr_sched: FtLrSched = None, gex_eps: GexEps = None,
    proj_dim: ProjDim = None, damping: Damping = None, damping_mode: DampingMode = None, matrix: Matrix = None,
    arnoldi_rank: Rank = None, ensemble_models: EnsModels = None, el2n_repeat: El2nRepeat = None,
    loss: LossType = "cross_entropy", bs_jacs: BsJacs = None, memory_gb: MemoryBudget = 2.0,
    out: o.Out = Path("runs/lds"), quiet: o.Quiet = False,
) -> None:
    """Linear datamodeling score per method (ground truth: models on random α-subsets, cached in --out)."""
    from modelsense.experiments.influence import run_lds

    set_quiet(quiet)
    metrics = run_lds(data_cfg, model_cfg, train_cfg, out, methods=methods, n_models=n_models, alpha=alpha, n_test=n_test,
                      chunk_models=chunk_models, progress=not quiet, settings=_settings(
                          num_ens, ft_lr, ft_step, ft_lr_sched, gex_eps, proj_dim, damping, damping_mode, matrix,
                          arnoldi_rank, ensemble_models, el2n_repeat, loss, bs_jacs, memory_gb))
    _print(metrics, ("lds", "seconds"), out)


@app.command()
@o.with_configs(**CLEAN)
def influence(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    method: Annotated[str, typer.Option("--method", help="grad-dot, grad-cos, randproj, tracin, tracin-rp, if-explicit, "
                                        "if-cg, if-lissa, if-kfac, if-ekfac, arnoldi, gex, la-kfac, trak, el2n, loss, mpe")] = "if-ekfac",
    self_only: Annotated[bool, typer.Option("--self", help="self-influence only (N,) instead of the (N, n_test) matrix")] = False,
    n_test: Annotated[Optional[int], typer.Option("--n-test", help="first n test examples (default all)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="most helpful / harmful training examples shown per test example")] = 5,
    num_ens: NumEns = None, ft_lr: FtLr = None, ft_step: FtStep = None, ft_lr_sched: FtLrSched = None, gex_eps: GexEps = None,
    proj_dim: ProjDim = None, damping: Damping = None, damping_mode: DampingMode = None, matrix: Matrix = None,
    arnoldi_rank: Rank = None, ensemble_models: EnsModels = None, el2n_repeat: El2nRepeat = None,
    loss: LossType = "cross_entropy", bs_jacs: BsJacs = None, memory_gb: MemoryBudget = 2.0,
    out: o.Out = Path("runs/influence"), quiet: o.Quiet = False,
) -> None:
    """One method's influence scores (score(i, j) ≈ rise of test loss j when training example i is removed)."""
    from modelsense.experiments.influence import run_influence

    set_quiet(quiet)
    metrics = run_influence(data_cfg, model_cfg, train_cfg, out, method=method, self_only=self_only, n_test=n_test,
                            top_k=top_k, progress=not quiet, settings=_settings(
                                num_ens, ft_lr, ft_step, ft_lr_sched, gex_eps, proj_dim, damping, damping_mode, matrix,
                                arnoldi_rank, ensemble_models, el2n_repeat, loss, bs_jacs, memory_gb))
    console.print(f"{metrics['method']}: scores of shape {metrics['shape']} in {metrics['seconds']:.1f}s -> {out}")
