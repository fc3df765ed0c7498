"""Subset-training farm throughput: the retraining engine against its batched-matmul limit and a loop.

Part 1 (the target): R = 256 MLPs (64-128-10) on digits, each on its own random 70% subset
(`subset_jobs`, the memorization command's sampling), a few epochs of SGD, trained by
`retraining.train_chunk` (one engine chunk of R models, with the train and test outputs the store
keeps), against `fit` (module + torch.optim.SGD + backward) once per model with the same seeds,
masks and batch order (timed on the first `--loop-models` models, scaled to R: its cost per model is
constant), and against the batched-matmul limit (the engine's forward + backward matmuls issued as
one `baddbmm` / `bmm` over the R models per layer, for as many steps as the engine takes; see
bench/ensemble.py). `farm_over_bmm_limit` = limit time / farm time (the farm's time includes its
train and test outputs, so this is a slight underestimate of the training part's fraction). The
three arms are repeated `--repeats` times interleaved; medians are reported.

Part 2: the original's MNIST setting (R = 2000, ρ = 0.7, MLP 784-512-256-10, batch 128, 10 epochs),
timed on one chunk of `--mnist-chunk` models for 40 steps on MNIST-shaped random data (median of
`--repeats`), plus one evaluation pass on the 60k train and 10k test examples, and extrapolated.

Last line: a JSON object with `farm_over_bmm_limit`, `speedup_vs_loop`, the MNIST projection and
`peak_rss_mb`.

Run: PYTHONPATH=src python bench/memorization.py [--device cuda] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import torch
from _common import bench_parser, bmm_limit, end_figures, machine, median, mlp_dims, start_bench, step_flops, timed

from modelsense.data import DataConfig, load_dataset
from modelsense.data.dataset import Dataset
from modelsense.models import ModelConfig, build_model
from modelsense.retraining import RetrainRecipe, subset_jobs
from modelsense.retraining.store import train_chunk
from modelsense.training import TrainConfig, fit
from modelsense.training.ensemble import train_ensemble


def farm_vs_loop(n_models: int, epochs: int, loop_models: int, repeats: int, device: str) -> dict:
    data = load_dataset("digits")
    cfg = TrainConfig(epochs=epochs, bs=64, eval_every=0, device=device)
    recipe = RetrainRecipe(DataConfig("digits"), ModelConfig("mlp", widths=(128,)), cfg)
    jobs = subset_jobs(data.n_train, 0.7, range(n_models))
    dims = mlp_dims(data.input_shape, data.num_classes, (128,))
    steps = epochs * max(math.ceil(int(j.mask.sum()) / cfg.bs) for j in jobs)
    flops = step_flops(dims, n_models, cfg.bs) * steps

    def loop() -> None:
        for job in jobs[:loop_models]:
            one = TrainConfig(**{**cfg.to_dict(), "seed": job.seed})
            module = build_model("mlp", data.input_shape, 10, widths=(128,), seed=job.seed)
            fit(module, data, one, train_indices=torch.from_numpy(job.mask).nonzero().flatten(), progress=False)
            with torch.no_grad():
                module(data.x_train.to(device)).argmax(1)
                module(data.x_test.to(device)).argmax(1)

    train_chunk(recipe, jobs[:2], data)  # warm-up of every arm
    fit(build_model("mlp", data.input_shape, 10, widths=(128,), seed=0), data, cfg,
        train_indices=torch.from_numpy(jobs[0].mask).nonzero().flatten(), progress=False)
    bmm_limit(dims, n_models, cfg.bs, 2, device)
    times: dict[str, list[float]] = {"farm": [], "loop": [], "bmm_limit": []}
    for r in range(repeats):
        times["farm"].append(timed(lambda: train_chunk(recipe, jobs, data), device)[0])
        times["loop"].append(timed(loop, device)[0] * n_models / loop_models)
        times["bmm_limit"].append(bmm_limit(dims, n_models, cfg.bs, steps, device))
        print(f"farm repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr,
              flush=True)
    med = {k: median(v) for k, v in times.items()}
    return {"n_models": n_models, "epochs": epochs, "steps": steps, "gflop": round(flops / 1e9, 2),
            "farm_s": round(med["farm"], 2), "loop_s_extrapolated": round(med["loop"], 2),
            "bmm_limit_s": round(med["bmm_limit"], 3), "loop_models_timed": loop_models,
            "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "farm_gflops": round(flops / med["farm"] / 1e9, 1),
            "bmm_limit_gflops": round(flops / med["bmm_limit"] / 1e9, 1),
            "farm_over_bmm_limit": round(med["bmm_limit"] / med["farm"], 3),
            "farm_models_per_s": round(n_models / med["farm"], 2),
            "loop_models_per_s": round(n_models / med["loop"], 2),
            "speedup_vs_loop": round(med["loop"] / med["farm"], 2)}


def mnist_setting(chunk: int, repeats: int, device: str, steps: int = 40) -> dict:
    n, n_models, epochs, bs = 60000, 2000, 10, 128
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = Dataset("mnist-shaped", x, y, x[:10000], y[:10000], 10)
    masks = torch.from_numpy(np.stack([j.mask for j in subset_jobs(n, 0.7, range(chunk))]))
    sub = masks.clone()  # train on a slice of `steps` batches per model to time the per-step cost
    for row in sub:
        on = row.nonzero().flatten()
        row[on[steps * bs:]] = False
    cfg = TrainConfig(lr=0.1, epochs=1, bs=bs, eval_every=0, device=device)

    def model_fn(seed: int):
        return build_model("mlp", (1, 28, 28), 10, widths=(512, 256), seed=seed)

    train_ensemble(model_fn, data.x_train, data.y_train, sub[:2], cfg, progress=False, queries={})  # warm-up
    runs = [timed(lambda: train_ensemble(model_fn, data.x_train, data.y_train, sub, cfg, progress=False,
                                         keep_logits=False, queries={}), device)[0] / steps for _ in range(repeats)]
    per_step = median(runs)
    steps_per_model = epochs * int(np.ceil(0.7 * n / bs))
    one = torch.zeros_like(sub)  # the evaluation pass: one step on one example (lr 1e-9), then the queries
    one[:, 0] = True
    t_eval, _ = timed(lambda: train_ensemble(
        model_fn, data.x_train, data.y_train, one, TrainConfig(lr=1e-9, epochs=1, bs=1, device=device),
        progress=False, keep_logits=False, queries={"train": (x, y), "test": (data.x_test, data.y_test)}), device)
    total_s = (per_step * steps_per_model + t_eval) * n_models / chunk
    flops = step_flops(mlp_dims((1, 28, 28), 10, (512, 256)), n_models, bs) * steps_per_model
    hours_key = "mnist_r2000_cpu_hours_estimate" if device == "cpu" else "mnist_r2000_hours_estimate"
    return {"mnist_chunk": chunk, "mnist_seconds_per_chunk_step": round(per_step, 4),
            "mnist_seconds_per_chunk_step_runs": [round(t, 4) for t in runs],
            "mnist_gflops": round(step_flops(mlp_dims((1, 28, 28), 10, (512, 256)), chunk, bs) / per_step / 1e9, 1),
            "mnist_eval_s_per_chunk": round(t_eval, 2),
            hours_key: round(total_s / 3600, 2),
            "mnist_r2000_training_tflop": round(flops / 1e12, 1)}


if __name__ == "__main__":
    ap = bench_parser(__doc__.splitlines()[0], threads=2, repeats=3)
    ap.add_argument("--n-models", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--loop-models", type=int, default=16)
    ap.add_argument("--mnist-chunk", type=int, default=16)
    ap.add_argument("--skip-mnist", action="store_true")
    args = ap.parse_args()
    device = start_bench(args)
    figures = {"device": device, **machine(), "repeats": args.repeats}
    figures.update(farm_vs_loop(args.n_models, args.epochs, args.loop_models, args.repeats, device))
    print(f"farm: {figures['farm_s']}s ({figures['farm_gflops']} GFLOP/s), bmm limit {figures['bmm_limit_s']}s "
          f"({figures['bmm_limit_gflops']} GFLOP/s): farm/limit {figures['farm_over_bmm_limit']}; loop "
          f"{figures['loop_s_extrapolated']}s, speedup {figures['speedup_vs_loop']}x", file=sys.stderr)
    if not args.skip_mnist:
        figures.update(mnist_setting(args.mnist_chunk, args.repeats, device))
    print(json.dumps(end_figures(figures)))
