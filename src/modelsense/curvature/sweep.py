"""Curvature sweeps (width sweep, width x depth grid): models of several architectures (and seeds),
each trained on the whole training set, and the losses and top-k spectrum of each.

The models are retrained ground truth like any other (`modelsense.retraining.store`): one recipe per
architecture (`sweep_recipe`: the data, that architecture, the training options; the recipe keeps
the trained parameters), one job per seed (`full_job`: every training example), trained by the
engine in this process or on Ray and stored once, so a sweep, a grid and any other run given the same
`--store` reuse each other's models. `train_sweep` trains the models the store lacks, then measures
each model without a result (`measure`: losses from the store, spectrum over the training set or the
test set: `curvature_data`) and writes its result as one JSON file as soon as it is done, so a sweep
resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelsense.curvature.effdim import effective_dimension
from modelsense.curvature.spectrum import SpectrumConfig, compute_spectrum, count_params, curvature_model
from modelsense.data import DataConfig, Dataset
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import save_model
from modelsense.retraining.store import Job, RetrainOptions, RetrainRecipe, job_parameters, ray_session, retrain
from modelsense.runs import read_json, write_json
from modelsense.training.config import TrainConfig


def curvature_data(data: Dataset, use_test: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples the matrix is over: the training set, or the test set with `use_test`."""
    return (data.x_test, data.y_test) if use_test else (data.x_train, data.y_train)


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


def sweep_recipe(data: DataConfig, model: ModelConfig, train: TrainConfig) -> RetrainRecipe:
    """The store's recipe of a sweep model of architecture `model` (its parameters kept, for the spectrum);
    ConfigError for training options the engine does not train with."""
    return RetrainRecipe(data, model, train, params=True)


def full_job(n_train: int, seed: int) -> Job:
    """The store's job of a sweep model: every one of the `n_train` training examples, from `seed`."""
    return Job(np.ones(n_train, dtype=bool), int(seed))


def measure(module: nn.Module, data: Dataset, outputs: dict[str, np.ndarray], spectrum: SpectrumConfig,
            weights_only: bool = False, use_test: bool = False, seed: int = 0) -> dict[str, Any]:
    """The losses (means over `outputs`, the store's per-example train_loss / train_correct / test_loss /
    test_correct of the model) and the top-k spectrum of the trained `module` (over the training set,
    or the test set with `use_test`; all the eigenvalues of a model with fewer than k parameters)."""
    module = module.eval()
    n_curv = count_params(module, weights_only)
    start = time.perf_counter()
    cfg = replace(spectrum, k=min(spectrum.k, n_curv), seed=seed)
    x, y = curvature_data(data, use_test)
    result = compute_spectrum(curvature_model(module, weights_only), x, y, cfg)
    means = {f"{q}_{name}": float(np.mean(outputs[f"{q}_{key}"]))
             for q in ("train", "test") for name, key in (("loss", "loss"), ("accuracy", "correct"))}
    return {
        "n_params": count_params(module), "n_params_curvature": n_curv, **means,
        "test_error": 1.0 - means["test_accuracy"], "k": cfg.k, "use_test": use_test,
        "eigenvalues": [float(v) for v in result.eigenvalues],
        "eigenvalues_converged": [bool(c) for c in result.converged], "num_matvecs": result.num_matvecs,
        "spectrum_seconds": time.perf_counter() - start,
    }


def train_sweep(data: Dataset, data_cfg: DataConfig, models: Sequence[SweepModel], train_cfg: TrainConfig,
                spectrum: SpectrumConfig, weights_only: bool, use_test: bool, s: float, options: RetrainOptions,
                run_path: str | Path, save_models: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Measure every model without a stored result (a damaged one is measured again): train the models
    the store (`options.root(run_path)`) lacks, one `retrain` per architecture (its seeds trained
    together; all in one `ray_session`), then `measure` each and write its result (labels, model, seed,
    the store's recipe digest and job key, `measure`'s numbers) and, with `save_models`, its weights.
    Returns (the results of all `models` in their order, the number measured here); `s` is the N_eff
    logged per model."""
    log = log or (lambda message: None)
    for m in models:  # stored state is checked first: a damaged result is measured again
        if m.path.exists():
            try:
                read_json(m.path)
            except ConfigError as err:
                m.path.unlink()
                log(f"{m.name}: its stored result was damaged ({err}); measuring it again")
    todo = [m for m in models if not m.path.exists()]
    if len(todo) < len(models):
        log(f"resume: {len(models) - len(todo)} of {len(models)} models measured, {len(todo)} to go")
    by_architecture: dict[str, list[SweepModel]] = {}
    for m in todo:
        by_architecture.setdefault(repr(m.config), []).append(m)
    with ray_session():  # one Ray session for all architectures (--backend ray), started when needed
        for group in by_architecture.values():
            recipe = sweep_recipe(data_cfg, group[0].config, train_cfg)
            jobs = [full_job(data.n_train, m.seed) for m in group]
            tables = retrain(recipe, jobs, options, run_path, data=data, progress=progress, log=log)
            for i, (m, job) in enumerate(zip(group, jobs)):
                module = build_model_from_config(m.config, data.input_shape, data.num_classes, seed=m.seed)
                module.load_state_dict(job_parameters(tables, i), strict=False)
                numbers = measure(module, data, {k: v[i] for k, v in tables.items()}, spectrum, weights_only, use_test,
                                  m.seed)
                result = {**m.labels, "model": asdict(m.config), "seed": m.seed, **numbers,
                          "store": {"recipe": recipe.digest(), "job": job.key()}}
                if save_models:
                    save_model(m.weights, module, m.config, data, m.seed)
                write_json(m.path, result)
                neff = effective_dimension(torch.tensor(result["eigenvalues"]), s,
                                           converged=torch.tensor(result["eigenvalues_converged"]))
                log(f"{m.name}: {result['n_params']} params, train loss {result['train_loss']:.4g}, "
                    f"test loss {result['test_loss']:.4g}, N_eff {neff:.4g}")
    return [read_json(m.path) for m in models], len(todo)


__all__ = ["SweepModel", "curvature_data", "full_job", "measure", "sweep_recipe", "train_sweep"]
