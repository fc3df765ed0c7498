"""One model of a curvature sweep (width sweep, width x depth grid): train it and measure its losses
and top-k spectrum (`train_and_measure`), over the training set or the test set (`curvature_data`).
Numbers in, numbers out; `modelsense.experiments.curvature` stores the results and resumes sweeps."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from modelsense.curvature.spectrum import (
    SpectrumConfig,
    compute_spectrum,
    count_params,
    curvature_model,
)
from modelsense.data import Dataset
from modelsense.models import ModelConfig, build_model_from_config
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
