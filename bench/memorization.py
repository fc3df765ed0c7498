"""Subset-training farm throughput: the retraining engine against a one-by-one PyTorch loop.

Part 1 (the target): R = 256 MLPs (64-128-10) on digits, each on its own random 70% subset, a few
epochs of SGD. Engine = `retraining.train_chunk` (one vmapped chunk of 256 models); baseline = `fit`
(module + torch.optim.SGD + backward) once per model with the same seeds, masks and batch order;
both in this run, both warmed up. The baseline is timed on the first `loop_models` models and
scaled to R (its cost per model is constant).

Part 2: the original's MNIST setting (R = 2000, ρ = 0.7, MLP 784-512-256-10, batch 128, 10 epochs),
timed on one chunk for one epoch on MNIST-shaped random data and extrapolated.

Last line: a JSON object with `speedup_vs_loop` and the details.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from modelsense.data import DataConfig, load_dataset
from modelsense.data.dataset import Dataset
from modelsense.models import ModelConfig, build_model
from modelsense.retraining import FarmSpec, model_masks, train_chunk
from modelsense.training import TrainConfig, fit
from modelsense.training.ensemble import train_ensemble


def farm_vs_loop(n_models: int = 256, chunk: int = 256, epochs: int = 2, loop_models: int = 32) -> dict:
    data = load_dataset("digits")
    spec = FarmSpec(
        DataConfig("digits"), ModelConfig("mlp", widths=(128,)), TrainConfig(epochs=epochs, bs=64, eval_every=0), 0.7
    )
    train_chunk(spec, [0, 1], data)  # warm-up
    start = time.perf_counter()
    for lo in range(0, n_models, chunk):
        train_chunk(spec, list(range(lo, min(lo + chunk, n_models))), data)
    t_engine = time.perf_counter() - start

    masks = model_masks(data.n_train, 0.7, range(loop_models))
    fit(build_model("mlp", data.input_shape, 10, widths=(128,), seed=0), data, spec.train,
        train_indices=torch.from_numpy(masks[0]).nonzero().flatten(), progress=False)  # warm-up
    start = time.perf_counter()
    for r in range(loop_models):
        cfg = TrainConfig(**{**spec.train.to_dict(), "seed": r})
        module = build_model("mlp", data.input_shape, 10, widths=(128,), seed=r)
        fit(module, data, cfg, train_indices=torch.from_numpy(masks[r]).nonzero().flatten(), progress=False)
        with torch.no_grad():
            module(data.x_train).argmax(1)
            module(data.x_test).argmax(1)
    t_loop = (time.perf_counter() - start) * n_models / loop_models
    return {"n_models": n_models, "epochs": epochs, "chunk": chunk, "engine_s": round(t_engine, 2),
            "loop_s_extrapolated": round(t_loop, 2), "engine_models_per_s": round(n_models / t_engine, 2),
            "loop_models_per_s": round(n_models / t_loop, 2), "speedup_vs_loop": round(t_loop / t_engine, 2)}


def mnist_setting(chunk: int = 16, steps: int = 40) -> dict:
    n, n_models, epochs, bs = 60000, 2000, 10, 128
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = Dataset("mnist-shaped", x, y, x[:10000], y[:10000], 10)
    masks = torch.from_numpy(model_masks(n, 0.7, range(chunk)))
    # train on a slice of `steps` batches per model to time the per-step cost
    sub = masks.clone()
    for row in sub:
        on = row.nonzero().flatten()
        row[on[steps * bs:]] = False
    cfg = TrainConfig(lr=0.1, epochs=1, bs=bs, eval_every=0)

    def model_fn(seed: int):
        return build_model("mlp", (1, 28, 28), 10, widths=(512, 256), seed=seed)

    train_ensemble(model_fn, data.x_train, data.y_train, sub[:2], cfg, progress=False)
    start = time.perf_counter()
    train_ensemble(model_fn, data.x_train, data.y_train, sub, cfg, progress=False, keep_logits=False, queries={})
    per_step = (time.perf_counter() - start) / steps
    steps_per_model = epochs * int(np.ceil(0.7 * n / bs))
    start = time.perf_counter()
    train_ensemble(model_fn, data.x_train, data.y_train, sub, TrainConfig(lr=1e-9, epochs=1, bs=n), progress=False,
                   keep_logits=False, queries={"train": (x, y), "test": (data.x_test, data.y_test)})
    t_eval = time.perf_counter() - start
    total_s = (per_step * steps_per_model + t_eval) * n_models / chunk
    flops = 6 * (784 * 512 + 512 * 256 + 256 * 10) * bs * steps_per_model * n_models
    return {"mnist_chunk": chunk, "mnist_seconds_per_chunk_step": round(per_step, 4),
            "mnist_r2000_cpu_hours_estimate": round(total_s / 3600, 2),
            "mnist_r2000_training_tflop": round(flops / 1e12, 1)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    figures = farm_vs_loop()
    print(
        f"farm: engine {figures['engine_s']}s, loop {figures['loop_s_extrapolated']}s, speedup "
        f"{figures['speedup_vs_loop']}x",
        file=sys.stderr,
    )
    figures.update(mnist_setting())
    print(json.dumps(figures))
