"""Memory benchmark: does peak memory grow with the number of training examples N faster than the output?

Each workload runs in a fresh Python process (so its peak RSS is its own) at two sizes, N and
`--factor` x N, on a map-style dataset made on the fly (`_common.IndexSeededDataset`, never held
whole: 64 features, 10 classes; an MLP 64-256-256-10, ~85k parameters). Printed per workload: the
peak RSS at both sizes, the growth between them, the growth of what the workload returns (its
output array), and their ratio `rss_growth_over_output_growth` (<= 1 plus noise: memory follows the
output; >> 1: something else grows with N). A workload whose output does not grow with N
(self-influence: N numbers; spectrum: k eigenvalues) reports its RSS growth in MiB instead. The
issue's rule (#15): no bench may grow with N faster than the output it writes.

The attributors keep per-example caches (e.g. the training gradients for self-influence) while they
fit the memory budget, so with a budget above them memory grows with N up to the budget by design;
the default `--memory-gb 0.5` lies below the caches of the larger size, so what is measured is what
the budget does not bound. Above their share of the budget the caches of the scores spill to a
memory-mapped scratch file (`ComputeOptions.spill`) whose pages are unmapped block by block once
written or read, so they stay in the page cache and out of the resident set.

    scores    if-ekfac fit + the (N, 500) score matrix, in memory (`--memory-gb` above it)
    self      if-ekfac fit + the self-influence of all N examples
    spectrum  top-5 GGN eigenvalues by Lanczos over the N examples (products read the data by chunks)

Each size runs `--repeats` times (default 3, fresh processes); the figures are the medians.

Run: PYTHONPATH=src .venv/bin/python bench/memory.py [--n 2000 --factor 4 --memory-gb 0.5 --repeats 3]
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _common import IndexSeededDataset, add_device_arg, check_bench_device, median, peak_rss_mb
from torch.utils.data import DataLoader

WORKLOADS = ("scores", "self", "spectrum")
N_TEST = 500


def run_one(workload: str, n: int, device: str, memory_gb: float, n_test: int = N_TEST) -> dict:
    """Run `workload` at size n in this process; its output's size (bytes) and this process's peak RSS."""
    from modelsense.attribution import ComputeOptions, make_attributor
    from modelsense.core.functional import FunctionalModel
    from modelsense.curvature import SpectrumConfig, compute_spectrum
    from modelsense.models import build_model

    model = build_model("mlp", (64,), 10, widths=(256, 256), seed=0).to(device).eval()
    train = DataLoader(IndexSeededDataset(n), batch_size=512)
    start = time.perf_counter()
    if workload == "spectrum":
        spectrum = compute_spectrum(FunctionalModel(model), train, config=SpectrumConfig(k=5))
        output = spectrum.eigenvalues
    else:
        compute = ComputeOptions(memory_budget=int(memory_gb * 2**30), progress=False)
        att = make_attributor("if-ekfac", compute=compute).fit(model, train)
        if workload == "scores":
            output = torch.as_tensor(att.scores(DataLoader(IndexSeededDataset(n_test, offset=10**9), batch_size=512)))
        else:
            output = att.self_scores()
    return {"workload": workload, "n": n, "seconds": round(time.perf_counter() - start, 2),
            "output_mb": output.numel() * output.element_size() / 2**20, "peak_rss_mb": peak_rss_mb()}


def measure(workload: str, n: int, device: str, memory_gb: float, n_test: int = N_TEST, repeats: int = 1) -> dict:
    """`run_one` in `repeats` fresh processes (each its own peak RSS); the JSON result with the median
    peak RSS and seconds (the peaks of identical runs differ by up to ~15 MiB here)."""
    cmd = [sys.executable, __file__, "--one", workload, "--n", str(n), "--device", device,
           "--memory-gb", str(memory_gb), "--n-test", str(n_test)]
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(repeats)]
    peaks = [r["peak_rss_mb"] for r in runs]
    return {**runs[0], "peak_rss_mb": median(peaks), "seconds": round(median([r["seconds"] for r in runs]), 2),
            "peak_rss_mb_runs": peaks}


def main(argv: list[str] | None = None) -> dict:
    p = add_device_arg(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--n", type=int, default=2_000, help="the smaller number of training examples")
    p.add_argument("--factor", type=int, default=4, help="the larger size is factor x n")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--memory-gb", type=float, default=0.5, help="the attributors' memory budget")
    p.add_argument("--n-test", type=int, default=N_TEST, help="test examples (columns of the score matrix)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per size (median peak RSS)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one workload here
    args = p.parse_args(argv)
    device = check_bench_device(args.device)
    if args.one:
        result = run_one(args.one, args.n, device, args.memory_gb, args.n_test)
        print(json.dumps(result), flush=True)
        return result
    figures: dict[str, dict] = {}
    for workload in args.workloads.split(","):
        small = measure(workload, args.n, device, args.memory_gb, args.n_test, args.repeats)
        large = measure(workload, args.n * args.factor, device, args.memory_gb, args.n_test, args.repeats)
        rss_growth = large["peak_rss_mb"] - small["peak_rss_mb"]
        output_growth = large["output_mb"] - small["output_mb"]
        row = {"n": [small["n"], large["n"]], "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
               "peak_rss_mb_runs": [small["peak_rss_mb_runs"], large["peak_rss_mb_runs"]],
               "seconds": [small["seconds"], large["seconds"]], "output_mb": [round(small["output_mb"], 2),
                                                                           round(large["output_mb"], 2)],
               "rss_growth_mb": round(rss_growth, 1)}
        if output_growth > 1.0:
            row["rss_growth_over_output_growth"] = round(rss_growth / output_growth, 2)
        figures[workload] = row
        print(f"{workload:9s} N {small['n']:>7} -> {large['n']:>7}: peak RSS {small['peak_rss_mb']:.0f} -> "
              f"{large['peak_rss_mb']:.0f} MiB (+{rss_growth:.0f}); output {small['output_mb']:.1f} -> "
              f"{large['output_mb']:.1f} MiB" + (f"; ratio {row['rss_growth_over_output_growth']}"
                                                 if "rss_growth_over_output_growth" in row else ""), flush=True)
    result = {"device": device, "threads": torch.get_num_threads(), "factor": args.factor, "figures": figures}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
