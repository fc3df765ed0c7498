"""Run one benchmark script and keep its figures: `python bench/record.py [--as NAME] ensemble.py [ARGS ...]`.

The script's last stdout line is its JSON object of figures (every script in bench/ prints one); it is
stored in bench/results/<script>.json (or <NAME>.json: a second setting of one script) with the command,
the date, the machine (platform, CPU count, torch version) and the load average before and after, so that
the documentation's "Measured numbers" page (generated from these files when the site builds) says where
and when each figure was measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    """Where the figures come from: platform, CPU count, torch version and device count."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def record(script: str, args: list[str], name: str | None = None) -> Path:
    """Run bench/`script` with `args`, parse its last line as JSON, write bench/results/<name or stem>.json."""
    path = HERE / script
    if not path.is_file():
        raise SystemExit(f"no benchmark script {path}")
    load_before = os.getloadavg()
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise SystemExit(f"{script} failed with exit code {done.returncode}; nothing recorded")
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    try:
        figures = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise SystemExit(f"{script} did not end with a JSON line ({err}); nothing recorded") from err
    entry = {"script": f"bench/{script}", "command": " ".join(["python", f"bench/{script}", *args]),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
             "figures": figures}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name or Path(script).stem}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry, indent=1) + "\n")
    tmp.replace(out)
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    name = None
    if argv[:1] == ["--as"] and len(argv) >= 2:
        name, argv = argv[1], argv[2:]
    if not argv:
        raise SystemExit(__doc__)
    record(argv[0], argv[1:], name)
