"""`modelsense memorization`: held-out subsample estimates (Feldman & Zhang), local or on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.memorization.estimators import MIN_HELD_OUT
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig


@app.command()
@o.with_configs(epochs=80, lr=0.1, bs=32, delta=0.01)
def memorization(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    subset_ratio: Annotated[float, typer.Option("--subset-ratio", help="fraction ρ of the training set each model sees")] = 0.7,
    n_models: Annotated[int, typer.Option("--n-models", help="number of subset-trained models R")] = 64,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="models trained together (vmapped) per chunk / Ray task")] = 32,
    backend: Annotated[str, typer.Option("--backend", help="local or ray")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: a local Ray instance)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue or extend the run in --out (its finished chunks are kept; the estimates are recomputed)")] = False,
    from_runs: Annotated[Optional[Path], typer.Option("--from-runs", help="estimate from existing runs <DIR>/<ratio>/<run>/aux_arrays.npz")] = None,
    influence: Annotated[str, typer.Option("--influence", help="topk (per test example), full (memory-mapped matrix) or none")] = "topk",
    top_k: Annotated[int, typer.Option("--top-k", help="influential training examples kept per test example")] = 10,
    influence_dtype: Annotated[str, typer.Option("--influence-dtype", help="float16 or float32 for --influence full")] = "float16",
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="bootstrap resamples for memorization intervals (0: none)")] = 0,
    min_held_out: Annotated[int, typer.Option("--min-held-out", help="fewest models that held an example out (and that trained on it) for its estimates to count; fewer: NaN, False in reliable.npy, left out of top-k and figures, counted as n_unreliable_train")] = MIN_HELD_OUT,
    out: o.Out = Path("runs/memorization"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Memorization, influence and consistency scores from models trained on random subsets."""
    from modelsense.experiments.memorization import run_from_runs, run_memorization

    set_quiet(quiet)
    if from_runs is not None:
        metrics = run_from_runs(from_runs, out, data=load_dataset_from_config(data_cfg), influence=influence, top_k=top_k,
                                influence_dtype=influence_dtype, bootstrap=bootstrap, overwrite=overwrite,
                                min_held_out=min_held_out)
    else:
        metrics = run_memorization(data_cfg, model_cfg, train_cfg, out, subset_ratio=subset_ratio, n_models=n_models,
                                   chunk_size=chunk_size, backend=backend, address=address, resume=resume,
                                   influence=influence, top_k=top_k, influence_dtype=influence_dtype,
                                   bootstrap=bootstrap, progress=not quiet, overwrite=overwrite, min_held_out=min_held_out)
    shown = {k: metrics[k] for k in ("n_models", "mean_memorization", "n_high_memorization", "n_unreliable_train", "auc_corrupted")
             if k in metrics}
    console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) + f"  -> {out}")
