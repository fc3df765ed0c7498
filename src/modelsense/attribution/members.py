"""Independently trained models for ensembled attributions (`trak`, `if-*` with n_models > 1, `el2n`).

Scores averaged over M models trained from scratch with different seeds (TRAK's ensembling) track
the *expected* effect of a training example over training randomness, which is what the linear
datamodeling score measures; the models are trained at once by the retraining engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params
from modelsense.errors import ConfigError


def reinitialised_copy(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of `module` whose layers are re-initialised (`reset_parameters`) from `seed`."""
    new = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in new.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    return new.train()


def train_members(
    model: FunctionalModel,
    like: Params,
    x: Tensor,
    y: Tensor,
    n_models: int,
    train_config=None,
    model_fn: Callable[[int], nn.Module] | None = None,
    subset_ratio: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[Params]:
    """Parameters of `n_models` models trained from scratch by `train_ensemble`.

    Args:
        model: the fitted model (its module is re-initialised when `model_fn` is None).
        like: a parameter dict giving the names, dtype and device of the returned dicts.
        train_config: `TrainConfig` of the models (default TrainConfig()).
        subset_ratio: each model trains on a random subset of this fraction of (x, y).
        seed: seeds of the models are train_config.seed + 1000 + 7919·seed + m.
    """
    from modelsense.training import TrainConfig, train_ensemble

    if n_models < 1:
        return []
    cfg = train_config or TrainConfig()
    module = model.module
    model_fn = model_fn or (lambda s: reinitialised_copy(module, s))
    n = len(x)
    if subset_ratio < 1:
        gen = torch.Generator().manual_seed(seed + 2)
        k = max(1, round(subset_ratio * n))
        masks = torch.zeros(n_models, n, dtype=torch.bool)
        for m in range(n_models):
            masks[m, torch.randperm(n, generator=gen)[:k]] = True
    else:
        masks = torch.ones(n_models, n, dtype=torch.bool)
    seeds = [cfg.seed + 1000 + seed * 7919 + m for m in range(n_models)]
    res = train_ensemble(model_fn, x.cpu().float(), y.cpu(), masks, cfg, seeds=seeds, queries={}, return_params=True,
                         progress=progress, likelihood=model.likelihood)
    first = next(iter(like.values()))
    missing = [k for k in like if k not in res.params]
    if missing:
        raise ConfigError(f"the ensemble's models lack parameters {missing[:3]} of the fitted model")
    return [{k: res.params[k][m].to(first.device, first.dtype) for k in like} for m in range(n_models)]
