"""Shared helpers of the bench scripts: the --device option, timers that wait for the GPU, peak RSS.

Every bench script imports these (run as `python bench/<name>.py`, so `bench/` is on sys.path).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def add_device_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--device` (cpu, cuda or cuda:K) to a bench's argument parser."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K: where the measured arms run")
    return parser


def check_bench_device(device: str) -> str:
    """The device string, refused with a clear message when CUDA is asked for but absent."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {device}: no CUDA device is available here")
    return device


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


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def machine() -> dict:
    """Threads and 1-minute load average, printed beside every measured figure."""
    return {"threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)}
