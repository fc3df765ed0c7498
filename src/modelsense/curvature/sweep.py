"""Curvature sweeps (width sweep, width x depth grid): train each model and measure its losses and
top-k spectrum (`train_and_measure`, over the training set or the test set: `curvature_data`), and
run a sweep resumably (`train_sweep`: one JSON result per model, written as soon as it is done)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsense.curvature.effdim import effective_dimension
from modelsense.curvature.spectrum import (
    SpectrumConfig,
    compute_spectrum,
    count_params,
    curvature_model,
)
from modelsense.data import Dataset
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import save_model
from modelsense.progress import progress_bar
from modelsense.runs import read_json, write_json
from modelsense.training import fit
from modelsense.training.config import TrainConfig


def curvature_data(data: Dataset, use_test: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples the matrix is over: the training set, or the test set with `use_test`."""
    return (data.x_test, data.y_test) if use_test else (data.x_train, data.y_train)

def train_and_measure(data: Dataset, train_cfg: TrainConfig, model_cfg: ModelConfig, spectrum: SpectrumConfig,
                      weights_only: bool = False, use_test: bool = False,
                      on_epoch=None) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model_cfg` with `train_cfg` and measure its losses and top-k spectrum (over the training
    set, or the test set with `use_test`); returns (module, result)."""
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    n_curv = count_params(module, weights_only)
    start = time.perf_counter()
    result = fit(module, data, train_cfg, progress=False, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - start
    module = module.eval()
    start = time.perf_counter()
    # a model with fewer parameters than k: all its eigenvalues (the exact N_eff)
    cfg = replace(spectrum, k=min(spectrum.k, n_curv), seed=train_cfg.seed)
    x, y = curvature_data(data, use_test)
    spectrum = compute_spectrum(curvature_model(module, weights_only), x, y, cfg)
    final = result.final
    return module, {
        "model": asdict(model_cfg), "seed": train_cfg.seed, "n_params": count_params(module),
        "n_params_curvature": n_curv,
        **{k: final[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
        "test_error": 1.0 - final["test_accuracy"], "k": cfg.k, "use_test": use_test,
        "eigenvalues": [float(v) for v in spectrum.eigenvalues],
        "eigenvalues_converged": [bool(c) for c in spectrum.converged], "num_matvecs": spectrum.num_matvecs,
        "history": {key: list(v) for key, v in result.history.items()},
        "train_seconds": train_seconds, "spectrum_seconds": time.perf_counter() - start,
    }


@dataclass(frozen=True)
class SweepModel:
    """One model of a sweep: where its result goes (a JSON file; the resumable state), its
    architecture and seed, what identifies it in the result (`labels`, e.g. {"width": 8}), and where
    its weights go when kept."""

    path: Path
    config: ModelConfig
    seed: int
    labels: dict[str, int]
    weights: Path

    @property
    def name(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.labels.items())


def train_sweep(data: Dataset, models: Sequence[SweepModel], train_cfg: TrainConfig, spectrum: SpectrumConfig,
                weights_only: bool, use_test: bool, s: float, save_models: bool = False, noun: str = "models",
                progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Train and measure (`train_and_measure`, with `train_cfg` but each model's seed) every model
    without a stored result, writing each result (its labels and `train_and_measure`'s) as soon as it is
    done, and its weights when `save_models`; a damaged result is trained again. Returns (the results of
    all `models` in their order, the number trained); `s` is the N_eff logged per model."""
    log = log or (lambda message: None)
    for m in models:  # stored state is checked first: a damaged result is trained again
        if m.path.exists():
            try:
                read_json(m.path)
            except ConfigError as err:
                m.path.unlink()
                log(f"{m.name}: its stored result was damaged ({err}); training it again")
    todo = [m for m in models if not m.path.exists()]
    if len(todo) < len(models):
        log(f"resume: {len(models) - len(todo)} {noun} finished, {len(todo)} to train")
    # a few evaluations per model (progress and learning curves) instead of one per epoch
    cfg = replace(train_cfg, eval_every=max(1, train_cfg.epochs // 20))
    with progress_bar(len(todo) * cfg.epochs, noun, enabled=progress) as bar:
        for m in todo:
            done = [0]

            def on_epoch(epoch: int, row: dict[str, float], m: SweepModel = m, done: list[int] = done) -> None:
                bar.advance(epoch - done[0], description=m.name, loss=row["train_loss"])
                done[0] = epoch

            module, result = train_and_measure(data, replace(cfg, seed=m.seed), m.config, spectrum, weights_only,
                                               use_test, on_epoch)
            result = {**m.labels, **result}
            bar.advance(cfg.epochs - done[0])
            if save_models:
                save_model(m.weights, module, m.config, data, m.seed)
            write_json(m.path, result)
            neff = effective_dimension(torch.tensor(result["eigenvalues"]), s,
                                       converged=torch.tensor(result["eigenvalues_converged"]))
            log(f"{m.name}: {result['n_params']} params, train loss {result['train_loss']:.4g}, "
                f"test loss {result['test_loss']:.4g}, N_eff {neff:.4g}")
            bar.set_info(**m.labels, test_loss=result["test_loss"], N_eff=neff)
    return [read_json(m.path) for m in models], len(todo)


__all__ = ["SweepModel", "curvature_data", "train_and_measure", "train_sweep"]
