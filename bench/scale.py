"""Scale benchmark: `if-ekfac` on a CIFAR-10-shaped set that is never held in memory.

Setting (defaults, the issue's): a synthetic set of 50,000 training and 200 test images of shape
3 x 32 x 32 in 10 classes, each image made on the fly from its index (a seeded class pattern plus
noise; the set is a map-style `torch.utils.data.Dataset`, read in batches by position, never whole:
50,000 float32 images would be 614 MB); the registered `resnet18` (PreAct ResNet-18, GroupNorm) at
base width 16 (about 0.7M parameters), initialised from `--seed` and optionally trained for `--epochs`
with SGD through a `DataLoader`; then, with `--memory-gb 4` as the memory budget:

    fit      EK-FAC factors and eigenvalues of the GGN over all training examples (`if-ekfac`)
    scores   the 50,000 x 200 score matrix (memory-mapped when above the budget)
    self     the self-influence of all 50,000 training examples

`--model vit` runs the same on the registered tiny vision transformer (`--width 64`, 2 blocks,
`--patch 4`: each image a sequence of 64 tokens of 48 pixels; about 75k parameters): the transformer
variant (Linear layers on sequences, LayerNorm and position fallback blocks).

The GGN's factors: `--mc-samples 1` (the benchmark's default; kronfluence's) draws one target per
example from the model's predictive distribution, an unbiased Monte-Carlo estimate of the GGN at one
backward pass per example in each of the fit's two passes; `--mc-samples 0` is the exact GGN of the
method's default, C = 10 backward passes per example in each (about 3x the fit's time here).

Printed: the time of each stage (wall seconds and ms per training example; in the JSON also the process
CPU seconds, which a loaded machine changes less), the peak resident memory
of the process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), the machine's load average (other
processes slow a shared machine down), and a last JSON line with all of them. `--n-train` /
`--n-test` make a small run take seconds (e.g. `--n-train 500 --n-test 20`). `--device cuda` runs
the same on a GPU (the paper-scale run at `--width 64`).

Run: PYTHONPATH=src .venv/bin/python bench/scale.py [--n-train 50000 --n-test 200 --memory-gb 4]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from _common import IndexSeededDataset
from torch.utils.data import DataLoader, Dataset

from modelsense.attribution import ComputeOptions, make_attributor
from modelsense.models import build_model

#: the CIFAR-10 image shape
IMAGE = (3, 32, 32)


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def keep_freed_memory() -> bool:
    """glibc only: serve large allocations from the heap and keep freed memory there (mallopt
    M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 16 GiB), so the per-chunk temporaries (unfolded inputs,
    (rows, P) gradient blocks of ~0.5 GB) reuse memory instead of being mapped and page-faulted in anew
    each time; measured here, a third of the CPU time went to those page faults (system time). False
    where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 2**30)) and bool(libc.mallopt(-1, 2**34))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def load() -> str:
    """The machine's 1/5/15-minute load averages (os.getloadavg), as `uptime` prints them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def stage(seconds: float, n: int) -> str:
    return f"{seconds:.1f} s ({1e3 * seconds / n:.1f} ms per training example)"


def train(model: torch.nn.Module, data: Dataset, epochs: int, lr: float, bs: int, device: str, seed: int) -> float:
    """Plain SGD (momentum 0.9) on the mean cross-entropy, data read by a shuffled DataLoader; the
    training loss of the last epoch."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=bs, shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    last = math.nan
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total, count = total + float(loss) * len(y), count + len(y)
        last = total / count
    return last


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--model", default="resnet18", choices=("resnet18", "vit"))
    p.add_argument("--width", type=int, default=None,
                   help="resnet18: base width k (default 16; 64: the standard one); vit: token width (default 64)")
    p.add_argument("--patch", type=int, default=4, help="vit: patch side (32x32 images -> (32/patch)^2 tokens)")
    p.add_argument("--memory-gb", type=float, default=4.0, help="memory budget in GiB (ComputeOptions.memory_budget)")
    p.add_argument("--matrix", default="ggn", choices=("ggn", "ef"),
                   help="curvature of if-ekfac: ggn (the method's default; C backward passes per example in the fit) "
                        "or ef (empirical Fisher, one)")
    p.add_argument("--mc-samples", type=int, default=1,
                   help="GGN: Monte-Carlo targets per example (if-ekfac mc_samples; 0: the exact GGN, C passes)")
    p.add_argument("--epochs", type=int, default=0, help="SGD epochs before scoring (0: the initialised model)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-keep-freed-memory", dest="keep_freed", action="store_false",
                   help="leave glibc's allocator as it is (default: keep freed memory, see keep_freed_memory)")
    p.add_argument("--scratch", default=None, help="folder of memory-mapped score files (default: the temp dir)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory() if args.keep_freed else False
    t_start = time.perf_counter()
    train_set = IndexSeededDataset(args.n_train, IMAGE, seed=args.seed, grid=4)
    test_set = IndexSeededDataset(args.n_test, IMAGE, seed=args.seed, offset=10**9, grid=4)
    if args.model == "resnet18":
        args.width = args.width or 16
        model = build_model("resnet18", (3, 32, 32), 10, width=args.width, norm="gn", seed=args.seed)
        what = f"resnet18 width {args.width} (GroupNorm)"
    else:
        args.width = args.width or 64
        model = build_model("vit", (3, 32, 32), 10, width=args.width, depth=2, patch=args.patch, seed=args.seed)
        what = f"vit width {args.width}, 2 blocks, {(32 // args.patch) ** 2} tokens of {3 * args.patch**2}"
    model = model.to(args.device)
    n_params = sum(q.numel() for q in model.parameters())
    mc_samples = args.mc_samples if args.matrix == "ggn" else 0
    print(f"{what}: {n_params} parameters; {args.n_train} train / {args.n_test} test images 3x32x32 made on the fly; "
          f"memory budget {args.memory_gb:g} GiB; {torch.get_num_threads()} threads; {args.matrix}"
          f"{f' ({mc_samples} Monte-Carlo targets per example)' if mc_samples else ''}; load {load()}", flush=True)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (all threads): what the stage costs whatever the load
    t0 = time.perf_counter()
    train_loss = train(model, train_set, args.epochs, args.lr, args.bs, args.device, args.seed) if args.epochs else None
    times["train"] = time.perf_counter() - t0
    model.eval()
    compute = ComputeOptions(memory_budget=int(args.memory_gb * 2**30), scratch_dir=args.scratch, progress=False)
    extra = {"mc_samples": mc_samples} if mc_samples else {}  # (0, the default: also runs on older versions)
    att = make_attributor("if-ekfac", matrix=args.matrix, compute=compute, **extra)
    loader = DataLoader(train_set, batch_size=256, shuffle=False)
    t0, c0 = time.perf_counter(), time.process_time()
    att.fit(model, loader)
    times["fit"], cpu["fit"] = time.perf_counter() - t0, time.process_time() - c0
    print(f"fit (EK-FAC over {args.n_train} examples): {stage(times['fit'], args.n_train)}, peak RSS "
          f"{peak_rss_gb():.2f} GiB, load {load()}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    scores = att.scores(DataLoader(test_set, batch_size=256, shuffle=False))
    times["scores"], cpu["scores"] = time.perf_counter() - t0, time.process_time() - c0
    where = f"memory-mapped at {att.scores_path_}" if hasattr(att, "scores_path_") else "in memory"
    print(f"scores {tuple(scores.shape)} ({where}): {stage(times['scores'], args.n_train)}, peak RSS "
          f"{peak_rss_gb():.2f} GiB, load {load()}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    self_scores = att.self_scores()
    times["self"], cpu["self"] = time.perf_counter() - t0, time.process_time() - c0
    print(f"self-influence ({len(self_scores)}): {stage(times['self'], args.n_train)}, peak RSS "
          f"{peak_rss_gb():.2f} GiB, load {load()}", flush=True)
    finite = bool(torch.isfinite(self_scores).all()) and bool(torch.isfinite(torch.as_tensor(scores[:100])).all())
    result = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "model": args.model,
        "width": args.width,
        "n_params": n_params,
        "memory_gb": args.memory_gb,
        "matrix": args.matrix,
        "mc_samples": mc_samples,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "malloc_keep_freed": malloc_tuned,
        "epochs": args.epochs,
        "train_loss": train_loss,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "ms_per_train_example": {k: round(1e3 * v / args.n_train, 2) for k, v in times.items() if k != "train"},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "scores_shape": list(scores.shape),
        "finite": finite,
        "self_influence_mean": float(self_scores.double().mean()),
        "load_average": load(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
