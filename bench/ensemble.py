"""Throughput of the retraining engine against training the same models one by one.

M = 64 MLPs (64-128-128-10, ReLU) on digits, each on its own random 70% subset, SGD with momentum,
cosine schedule. Baseline: `fit` (a plain PyTorch loop: module, torch.optim.SGD, backward) called once
per model with the same seeds, masks and batch order, measured in the same run. Both are warmed up
first. Also checks that the two give the same models (max |logit difference| on the test set).
Last line: a JSON object with `speedup_vs_loop` (at the default batch size 64) and the details.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.training.config import TrainConfig
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import fit


def main(n_models: int = 64, epochs: int = 3, batch_sizes: tuple[int, ...] = (64, 32, 128)) -> dict:
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(n_models, data.n_train, generator=g) < 0.7

    def model_fn(seed: int):
        return build_model("mlp", data.input_shape, data.num_classes, seed=seed)

    figures: dict = {"n_models": n_models, "epochs": epochs, "threads": torch.get_num_threads(), "by_batch_size": {}}
    for bs in batch_sizes:
        cfg = TrainConfig(lr=0.05, epochs=epochs, bs=bs, eval_every=0)
        # warm-up of both paths (first-call costs of torch.func and of the optimizer)
        train_ensemble(model_fn, data.x_train, data.y_train, masks[:2], TrainConfig(epochs=1, bs=bs), progress=False)
        fit(
            model_fn(0),
            data,
            TrainConfig(epochs=1, bs=bs, eval_every=0),
            train_indices=masks[0].nonzero().flatten(),
            progress=False,
        )

        start = time.perf_counter()
        res = train_ensemble(model_fn, data.x_train, data.y_train, masks, cfg,
                             queries={"test": (data.x_test, data.y_test)}, progress=False)
        t_engine = time.perf_counter() - start

        start = time.perf_counter()
        logits = []
        for m in range(n_models):
            one = TrainConfig(**{**cfg.to_dict(), "seed": cfg.seed + m})
            f = fit(model_fn(cfg.seed + m), data, one, train_indices=masks[m].nonzero().flatten(), progress=False)
            with torch.no_grad():
                logits.append(f.module(data.x_test))
        t_loop = time.perf_counter() - start
        diff = (torch.stack(logits) - res.outputs["test"]["logits"]).abs().max().item()
        row = {
            "engine_s": round(t_engine, 3),
            "loop_s": round(t_loop, 3),
            "speedup_vs_loop": round(t_loop / t_engine, 2),
            "engine_models_per_s": round(n_models / t_engine, 2),
            "loop_models_per_s": round(n_models / t_loop, 2),
            "max_abs_logit_diff": diff,
        }
        figures["by_batch_size"][bs] = row
        print(
            f"bs={bs}: engine {t_engine:.2f}s, loop {t_loop:.2f}s, speedup {t_loop / t_engine:.1f}x, max |Δlogit| "
            f"{diff:.2e}",
            file=sys.stderr,
        )
    figures["speedup_vs_loop"] = figures["by_batch_size"][batch_sizes[0]]["speedup_vs_loop"]
    return figures


if __name__ == "__main__":
    print(json.dumps(main()))
