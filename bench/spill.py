"""Spill benchmark: is a spilled train-feature cache faster than recomputing the features per test block?

Setting: `if-ekfac` on an MLP 64-W-W-10 (`--widths`, default 256,256: ~85k parameters) over N
training and M test examples of `_common.IndexSeededDataset`, fitted once; then its (N, M) scores
with a memory budget (`--memory-mb`) below the N per-example gradients (N·P·4 bytes) and below the M
test-side ones, so the scores run test blocks outer (budget/4 of gradients each) and training blocks
inner (`FeatureAttributor._scores`, schedule 3). Three arms in the same process, alternated per repeat:

    recompute  spill=False: every block of training gradients is computed again for each test block
    spill      spill=True: each block computed once, written to a scratch file (unlinked at once) and
               read back on the later test blocks
    auto       spill="auto" (the default): spill unless timing the first block says recomputing is cheaper

Printed: the number of test blocks, per arm the median seconds of `--repeats` runs (and each run;
also the process CPU seconds, which a loaded machine changes less, but which leave out the kernel's
writeback of the spilled file), the speedup recompute / spill, the largest relative difference
between the arms' scores, the peak RSS of the process and the load average. The last line is JSON.

Run: PYTHONPATH=src .venv/bin/python bench/spill.py [--n 2000 --n-test 500 --memory-mb 160 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch
from _common import IndexSeededDataset, add_device_arg, check_bench_device, machine, median, peak_rss_mb, timed
from torch.utils.data import DataLoader

ARMS = {"recompute": False, "spill": True, "auto": "auto"}


def main(argv: list[str] | None = None) -> dict:
    p = add_device_arg(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--n", type=int, default=2_000, help="training examples")
    p.add_argument("--n-test", type=int, default=500, help="test examples")
    p.add_argument("--widths", default="256,256", help="hidden widths of the MLP")
    p.add_argument("--memory-mb", type=float, default=160, help="the memory budget of the scores, MiB")
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm (median)")
    p.add_argument("--scratch-dir", default=None, help="where the spilled cache goes (default: the temp dir)")
    args = p.parse_args(argv)
    device = check_bench_device(args.device)
    from modelsense.attribution import ComputeOptions, make_attributor
    from modelsense.models import build_model

    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model("mlp", (64,), 10, widths=widths, seed=0).to(device).eval()
    train = DataLoader(IndexSeededDataset(args.n), batch_size=512)
    test = DataLoader(IndexSeededDataset(args.n_test, offset=10**9), batch_size=512)
    compute = ComputeOptions(memory_budget=int(args.memory_mb * 2**20), scratch_dir=args.scratch_dir, progress=False)
    att = make_attributor("if-ekfac", compute=compute).fit(model, train)
    n_params = att.model_.n_params
    row_bytes = n_params * 4
    test_blocks = -(-args.n_test // max(1, min(compute.block_size, compute.memory_budget // 4 // row_bytes)))
    print(f"if-ekfac scores, N {args.n} x M {args.n_test}, P {n_params}: train gradients "
          f"{args.n * row_bytes / 2**20:.0f} MiB, budget {args.memory_mb:.0f} MiB -> {test_blocks} test blocks",
          flush=True)
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for arm, spill in ARMS.items():
            att.compute = replace(compute, spill=spill)
            start = time.process_time()
            t, results[arm] = timed(lambda: att.scores(test), device)
            seconds[arm].append(round(t, 3))
            cpu[arm].append(round(time.process_time() - start, 3))
    ref = results["recompute"]
    rel = max(float((results[arm] - ref).abs().max() / ref.abs().max()) for arm in ARMS)
    medians = {arm: median(ts) for arm, ts in seconds.items()}
    for arm in ARMS:
        print(f"{arm:10s} {medians[arm]:.2f} s (runs {seconds[arm]}); process CPU {median(cpu[arm]):.2f} s "
              f"(runs {cpu[arm]})", flush=True)
    speedup = medians["recompute"] / medians["spill"]
    print(f"recompute / spill {speedup:.2f}x, recompute / auto {medians['recompute'] / medians['auto']:.2f}x; "
          f"max relative difference {rel:.1e}; peak RSS {peak_rss_mb():.0f} MiB; load {os.getloadavg()[0]:.2f}",
          flush=True)
    result = {"device": device, **machine(), "n": args.n, "n_test": args.n_test, "widths": list(widths),
              "n_params": n_params, "memory_mb": args.memory_mb, "test_blocks": test_blocks, "seconds": seconds,
              "median_seconds": medians, "cpu_seconds": cpu, "recompute_over_spill": round(speedup, 2),
              "recompute_over_auto": round(medians["recompute"] / medians["auto"], 2),
              "max_relative_difference": rel, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
