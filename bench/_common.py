"""Shared helpers of the bench scripts: the --device option, timers that wait for the GPU, peak RSS, and
the synthetic data sets made from the example index (`IndexSeededDataset`).

Every bench script imports these (run as `python bench/<name>.py`, so `bench/` is on sys.path).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def add_device_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--device` (cpu, cuda or cuda:K) to a bench's argument parser."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K: where the measured arms run")
    return parser


def check_bench_device(device: str) -> str:
    """The device string, refused with a clear message when CUDA is asked for but absent."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {device}: no CUDA device is available here")
    return device


def bench_parser(description: str, *, threads: int, repeats: int) -> argparse.ArgumentParser:
    """An argument parser with the options of the timing benches: --device, --threads (`threads`; 0: torch's
    default) and --repeats (`repeats`); `start_bench` applies them."""
    parser = add_device_arg(argparse.ArgumentParser(description=description))
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs of each arm")
    return parser


def start_bench(args: argparse.Namespace) -> str:
    """Check --device (refused when CUDA is absent) and set --threads (0: leave torch's default); the device."""
    device = check_bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def end_figures(figures: dict) -> dict:
    """`figures` with the load average at the end of the run and the peak RSS added."""
    figures["load_average_1min_end"] = machine()["load_average_1min"]
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on CPU), so a timer measures finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """Wall-clock seconds of `fn()` (synchronising the device before and after) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    """The median of the repeats of one arm."""
    return statistics.median(values)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process so far (or, with `children`, of the largest of its waited-for
    child processes), in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def machine() -> dict:
    """Threads and 1-minute load average, printed beside every measured figure."""
    return {"threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)}


def mlp_dims(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(d_in, d_out) of each Linear layer of the MLP."""
    sizes = [math.prod(input_shape), *widths, num_classes]
    return list(zip(sizes[:-1], sizes[1:]))


def step_flops(dims: list[tuple[int, int]], n_models: int, bs: int) -> int:
    """Matmul FLOPs of one forward + backward step of M models at batch size bs: forward and weight
    gradient in every layer, input gradient in every layer but the first."""
    per_example = sum(2 * a * b * (3 if layer else 2) for layer, (a, b) in enumerate(dims))
    return per_example * bs * n_models


def bmm_limit(dims: list[tuple[int, int]], n_models: int, bs: int, steps: int, device: str) -> float:
    """Seconds for `steps` steps of the engine's matmuls issued as batched matmuls over the M models."""
    g = torch.Generator(device=device).manual_seed(0)
    kw = {"device": device, "generator": g}
    ws = [torch.randn(n_models, b, a, **kw) for a, b in dims]
    bias = [torch.randn(n_models, 1, b, **kw) for _, b in dims]
    hs = [torch.randn(n_models, bs, a, **kw) for a, _ in dims]  # layer inputs
    outs = [torch.empty(n_models, bs, b, device=device) for _, b in dims]
    grads_out = [torch.randn(n_models, bs, b, **kw) for _, b in dims]
    grads_w = [torch.empty(n_models, b, a, device=device) for a, b in dims]
    grads_in = [torch.empty(n_models, bs, a, device=device) for a, _ in dims]

    def run() -> None:
        for _ in range(steps):
            for layer in range(len(dims)):  # forward
                torch.baddbmm(bias[layer], hs[layer], ws[layer].transpose(1, 2), out=outs[layer])
            for layer in reversed(range(len(dims))):  # backward
                torch.bmm(grads_out[layer].transpose(1, 2), hs[layer], out=grads_w[layer])
                if layer:
                    torch.bmm(grads_out[layer], ws[layer], out=grads_in[layer])

    return timed(run, device)[0]


class IndexSeededDataset(Dataset):
    """n examples made from their index, never held whole: x_i = pattern[y_i] + noise · ε_i with
    y_i = (i·7919) mod `classes` and ε_i standard normal of `shape` drawn from the generator seeded
    seed·1,000,003 + offset + i, so an example is the same whenever it is read (`offset` separates
    the test examples' noise from the training examples').

    The class patterns are drawn once from `seed`: standard normal of `shape` (`grid` None: feature
    vectors), or, for images (C, H, W), a standard normal (C, grid, grid) grid per class upsampled
    bilinearly to H x W (smooth, so a small CNN learns them).
    """

    def __init__(self, n: int, shape: tuple[int, ...] = (64,), seed: int = 0, offset: int = 0, noise: float = 1.0,
                 classes: int = 10, grid: int | None = None) -> None:
        self.n, self.shape, self.seed, self.offset = int(n), tuple(shape), int(seed), int(offset)
        self.noise, self.classes = float(noise), int(classes)
        g = torch.Generator().manual_seed(self.seed)
        if grid is None:
            self.patterns = torch.randn(self.classes, *self.shape, generator=g)
        else:
            coarse = torch.randn(self.classes, self.shape[0], grid, grid, generator=g)
            self.patterns = F.interpolate(coarse, size=self.shape[1:], mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        label = (i * 7919) % self.classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i)
        return self.patterns[label] + self.noise * torch.randn(*self.shape, generator=g), label
