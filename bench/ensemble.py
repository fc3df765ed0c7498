"""Throughput of the retraining engine against its batched-matmul limit and a one-by-one loop.

Two settings, each with M MLPs (ReLU) on their own random 70% subsets, SGD with momentum, cosine
schedule, trained by the engine (`train_ensemble`, the models stacked) and, in the same run, by
`fit` (a plain PyTorch loop: module, torch.optim.SGD, backward) once per model with the same seeds,
masks and batch order (on the first `--loop-models` models, scaled to M):
  digits: 64-128-128-10 on digits, bs 64, M = 64;
  mnist:  784-512-256-10 on synthetic data of MNIST's shape (N examples of 1x28x28, 10 classes),
          bs 128, M = 16 (the original memorization setting's MLP).
Third arm, the batched-matmul limit: the matmuls of the engine's forward + backward (per layer: the
forward h W^T + b as one `torch.baddbmm` over the M models, the weight gradient and, except for the
first layer, the input gradient as one `torch.bmm` each), issued for as many steps as the engine
takes, into preallocated outputs. FLOPs = 2 per multiply-add of those matmuls at the full batch
size (what the engine issues each step), so the engine's GFLOP/s / the limit's GFLOP/s =
`engine_over_bmm_limit` = limit time / engine time. The three arms are run `--repeats` times
interleaved (after one warm-up each) and their medians compared. Both trained ensembles are checked
to agree (max |logit difference| on a held-out set).

Last line: a JSON object with, per setting, `engine_gflops`, `bmm_limit_gflops`,
`engine_over_bmm_limit`, `speedup_vs_loop`, the median seconds of each arm, and `peak_rss_mb`.

Run: PYTHONPATH=src python bench/ensemble.py [--device cuda] [--repeats 3] [--settings digits,mnist] [--threads 1]
On a shared machine whose load exceeds its cores, compare at --threads 1: with 2 threads under a load of
~10 on 2 cores every arm ran 2-15x slower (BLAS threads waiting for descheduled peers), the loop most.
"""

from __future__ import annotations

import json
import math
import sys

import torch
from _common import bench_parser, bmm_limit, end_figures, machine, median, mlp_dims, start_bench, step_flops, timed

from modelsense.data import load_dataset
from modelsense.data.dataset import Dataset
from modelsense.models import build_model
from modelsense.training.config import TrainConfig
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import fit


def setting(name: str, data: Dataset, widths: tuple[int, ...], n_models: int, bs: int, epochs: int, repeats: int,
            device: str, loop_models: int) -> dict:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(n_models, data.n_train, generator=g) < 0.7
    cfg = TrainConfig(lr=0.05, epochs=epochs, bs=bs, eval_every=0, device=device)
    dims = mlp_dims(data.input_shape, data.num_classes, widths)
    steps = epochs * max(math.ceil(int(k) / bs) for k in masks.sum(1))  # the engine's steps (all models in each)
    flops = step_flops(dims, n_models, bs) * steps

    def model_fn(seed: int):
        return build_model("mlp", data.input_shape, data.num_classes, widths=widths, seed=seed)

    def engine():
        res = train_ensemble(model_fn, data.x_train, data.y_train, masks, cfg,
                             queries={"test": (data.x_test, data.y_test)}, progress=False)
        return res.outputs["test"]["logits"]

    loop_models = min(loop_models or n_models, n_models)

    def loop():  # the first `loop_models` models (the cost per model is constant: scaled to M below)
        logits = []
        for m in range(loop_models):
            one = TrainConfig(**{**cfg.to_dict(), "seed": cfg.seed + m})
            f = fit(model_fn(cfg.seed + m), data, one, train_indices=masks[m].nonzero().flatten(), progress=False)
            with torch.no_grad():
                logits.append(f.module(data.x_test.to(device)).cpu())
        return torch.stack(logits)

    # warm-up of every arm (first-call costs of torch.func, the optimizer, the BLAS)
    warm = TrainConfig(**{**cfg.to_dict(), "epochs": 1})
    train_ensemble(model_fn, data.x_train, data.y_train, masks[:2], warm, queries={}, progress=False)
    fit(model_fn(0), data, warm, train_indices=masks[0].nonzero().flatten(), progress=False)
    bmm_limit(dims, n_models, bs, 2, device)
    times: dict[str, list[float]] = {"engine": [], "loop": [], "bmm_limit": []}
    diff = 0.0
    for r in range(repeats):
        t, ens = timed(engine, device)
        times["engine"].append(t)
        t, one = timed(loop, device)
        times["loop"].append(t * n_models / loop_models)
        times["bmm_limit"].append(bmm_limit(dims, n_models, bs, steps, device))
        diff = max(diff, (one - ens[:loop_models]).abs().max().item())
        print(f"{name} repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    med = {k: median(v) for k, v in times.items()}
    row = {
        "layers": [dims[0][0], *[b for _, b in dims]], "bs": bs, "n_models": n_models, "n_train": data.n_train,
        "epochs": epochs, "steps": steps, "loop_models_timed": loop_models, "gflop": round(flops / 1e9, 2),
        "engine_s": round(med["engine"], 3), "loop_s": round(med["loop"], 3), "bmm_limit_s": round(med["bmm_limit"], 3),
        "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "engine_gflops": round(flops / med["engine"] / 1e9, 1), "loop_gflops": round(flops / med["loop"] / 1e9, 1),
        "bmm_limit_gflops": round(flops / med["bmm_limit"] / 1e9, 1),
        "engine_over_bmm_limit": round(med["bmm_limit"] / med["engine"], 3),
        "speedup_vs_loop": round(med["loop"] / med["engine"], 2),
        "max_abs_logit_diff": diff,
    }
    print(f"{name}: engine {row['engine_gflops']} GFLOP/s, bmm limit {row['bmm_limit_gflops']} GFLOP/s "
          f"(engine/limit {row['engine_over_bmm_limit']}), loop {row['loop_gflops']} GFLOP/s "
          f"(speedup {row['speedup_vs_loop']}x), max |Δlogit| {diff:.1e}", file=sys.stderr, flush=True)
    return row


def mnist_shaped(n_train: int, n_test: int) -> Dataset:
    """Synthetic data of MNIST's shape: uniform pixels, random labels (the timing does not depend on them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset("mnist-shaped", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def main() -> dict:
    ap = bench_parser(__doc__.splitlines()[0], threads=0, repeats=3)
    ap.add_argument("--settings", default="digits,mnist")
    ap.add_argument("--digits-epochs", type=int, default=10)
    ap.add_argument("--digits-models", type=int, default=64)
    ap.add_argument("--mnist-epochs", type=int, default=1)
    ap.add_argument("--mnist-models", type=int, default=16)
    ap.add_argument("--mnist-n", type=int, default=6000, help="training examples of the MNIST-shaped data")
    ap.add_argument("--loop-models", type=int, default=0,
                    help="time the loop on this many models and scale to M (0: all M)")
    args = ap.parse_args()
    device = start_bench(args)
    figures: dict = {"device": device, **machine(), "repeats": args.repeats}
    names = [s for s in args.settings.split(",") if s]
    if "digits" in names:
        figures["digits"] = setting("digits", load_dataset("digits"), (128, 128), args.digits_models, 64,
                                    args.digits_epochs, args.repeats, device, args.loop_models)
    if "mnist" in names:
        figures["mnist"] = setting("mnist", mnist_shaped(args.mnist_n, 1000), (512, 256), args.mnist_models, 128,
                                   args.mnist_epochs, args.repeats, device, args.loop_models)
    first = figures[names[0]]
    figures.update({k: first[k] for k in ("engine_over_bmm_limit", "speedup_vs_loop")})
    return end_figures(figures)


if __name__ == "__main__":
    print(json.dumps(main()))
