"""Start-up time of the command line against importing torch alone.

Run: .venv/bin/python bench/cli_startup.py [--repeats 5]

Every CLI call pays for its imports before it does anything. The floor is `import torch` (every
command that computes needs it); the CLI should add little on top, so `modelsense --help` imports
only what the option declarations need and each command imports its experiment inside its body.

Timed in the same run, each in a fresh subprocess of this interpreter, alternating the two so that a
change of machine load hits both alike (one untimed warm-up of each first, for the file cache):
- `python -c "import torch"`
- `python -m modelsense --help`
Reported: the median of `--repeats` wall-clock times of each, their ratio (target: <= 1.5), and the
heavy modules that `--help` loads (none expected of matplotlib, scipy, sklearn, ray).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import peak_rss_mb

HEAVY = ("matplotlib", "scipy", "sklearn", "ray", "pandas", "ivon", "mnist1d")

COMMANDS = {
    "import_torch": [sys.executable, "-c", "import torch"],
    "help": [sys.executable, "-m", "modelsense", "--help"],
}


def wall_time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def heavy_modules_after_help() -> list[str]:
    """Top-level names among HEAVY that `modelsense --help` has imported when it exits."""
    code = ("import sys, runpy\n"
            "sys.argv = ['modelsense', '--help']\n"
            "try:\n    runpy.run_module('modelsense', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            f"print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    err = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stderr
    last = err.strip().splitlines()[-1]
    return [m for m in last.removeprefix("loaded:").split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    for cmd in COMMANDS.values():  # warm-up: file cache
        wall_time(cmd)
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(wall_time(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:14s} median {med[k]:.3f}s  runs " + " ".join(f"{t:.3f}" for t in v))
    heavy = heavy_modules_after_help()
    ratio = med["help"] / med["import_torch"]
    print(f"modelsense --help / import torch = {ratio:.2f} (target <= 1.5); heavy modules loaded: {heavy or 'none'}")
    print(json.dumps({
        "help_over_import_torch": round(ratio, 3),
        "help_seconds_median": round(med["help"], 3),
        "import_torch_seconds_median": round(med["import_torch"], 3),
        "repeats": args.repeats,
        "heavy_modules_loaded_by_help": heavy,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb_children": peak_rss_mb(children=True),
        "peak_rss_mb": peak_rss_mb(),
    }))


if __name__ == "__main__":
    main()
