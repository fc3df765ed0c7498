"""A user's dataset larger than its memory budget, through `--dataset file.py:make_data`.

This file is also the user's data file: `make_data()` returns a (train, test) pair of map-style
datasets whose items are made on the fly from their index (a seeded class pattern plus noise, shape
`--shape`, 10 classes), so the set is never held whole by the user's side. `--gib` sets the size of
the training inputs (float32; default 2 GiB: 32,768 examples of 4 x 64 x 64) and the test set is 1/32
of it. Each arm loads it in a fresh child process with `load_dataset(..., standardize=True)` (the
CLI's loader: read, finite checks, standardisation with the training statistics, tensors):

    mapped   the default: inputs above `scratch.IN_MEMORY_BYTES` (1 GiB) go to an unlinked
             memory-mapped file under $MODELSENSE_SCRATCH (default: the temp dir)
    memory   the threshold raised above the data's size: the in-memory path (what the loader did
             before, less its 8 GiB cap)

then reads x_train once in batches of 256 rows as training does (its mean square, 1 after
standardisation; `--no-read-pass` skips it).
Printed per arm: seconds to load, the peak resident set size after loading and at the end
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), the resident anonymous and file-backed memory at the
end (`/proc/self/status` RssAnon, RssFile: file-backed pages of the map are page cache the kernel can
drop, anonymous ones are not), the machine's load; the last line is JSON with all of them.

Run: PYTHONPATH=src .venv/bin/python bench/user_data.py [--gib 2 --arms mapped,memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPE_ENV, N_ENV = "USER_DATA_SHAPE", "USER_DATA_N"


class Patterns(Dataset):
    """`n` examples of `shape`: example i is class i % 10's fixed pattern plus seeded noise."""

    def __init__(self, n: int, shape: tuple[int, ...], offset: int) -> None:
        self.n, self.shape, self.offset = n, shape, offset
        self.patterns = np.random.default_rng(0).standard_normal((10, *shape), dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        noise = np.random.default_rng(self.offset + i).standard_normal(self.shape, dtype=np.float32)
        return self.patterns[i % 10] + 3 * noise, i % 10


def make_data() -> tuple[Dataset, Dataset]:
    shape = tuple(int(v) for v in os.environ[SHAPE_ENV].split("x"))
    n = int(os.environ[N_ENV])
    return Patterns(n, shape, 0), Patterns(max(10, n // 32), shape, n)


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(arm: str, read_pass: bool) -> dict:
    from _common import peak_rss_mb

    from modelsense.data import load_dataset, scratch

    if arm == "memory":
        scratch.IN_MEMORY_BYTES = 2**62
    start = time.perf_counter()
    ds = load_dataset(f"{os.path.abspath(__file__)}:make_data", standardize=True)
    out = {"arm": arm, "load_s": round(time.perf_counter() - start, 1), "n_train": ds.n_train,
           "x_train_gib": round(ds.x_train.numel() * 4 / 2**30, 3),
           "x_test_gib": round(ds.x_test.numel() * 4 / 2**30, 3),
           "peak_rss_after_load_mib": peak_rss_mb(),
           "rss_anon_after_load_mib": status_mib("RssAnon"), "rss_file_after_load_mib": status_mib("RssFile")}
    if read_pass:
        start = time.perf_counter()
        total = torch.zeros(())
        for s in range(0, ds.n_train, 256):
            total += ds.x_train[s:s + 256].double().square().sum()
        # the same in both arms: standardised inputs have a mean square of 1 (up to float32 rounding)
        out.update(read_s=round(time.perf_counter() - start, 1),
                   x_train_mean_square=round(float(total) / ds.x_train.numel(), 6))
    out.update(peak_rss_end_mib=peak_rss_mb(), rss_anon_end_mib=status_mib("RssAnon"),
               rss_file_end_mib=status_mib("RssFile"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of float32 training inputs")
    parser.add_argument("--shape", default="4x64x64", help="shape of one input, e.g. 4x64x64")
    parser.add_argument("--arms", default="mapped,memory", help="comma-separated: mapped, memory")
    parser.add_argument("--no-read-pass", dest="read_pass", action="store_false",
                        help="skip the pass over x_train in batches after loading")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.read_pass)))
        return
    shape = tuple(int(v) for v in args.shape.split("x"))
    n = max(10, int(args.gib * 2**30 // (4 * int(np.prod(shape)))))
    env = {**os.environ, SHAPE_ENV: args.shape, N_ENV: str(n)}
    results = []
    for arm in args.arms.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", arm]
        cmd += [] if args.read_pass else ["--no-read-pass"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"{arm:7s} load {res['load_s']:7.1f} s   x_train {res['x_train_gib']:.2f} GiB   peak RSS after load "
              f"{res['peak_rss_after_load_mib']:8.1f} MiB   at end {res['peak_rss_end_mib']:8.1f} MiB "
              f"(anon {res['rss_anon_end_mib']:.0f}, file {res['rss_file_end_mib']:.0f})", flush=True)
    print(json.dumps({"bench": "user_data", "shape": list(shape), "n_train": n, "arms": results,
                      "load_average_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
