"""The "Measured numbers" page as Markdown, generated from the benchmarks' recorded JSON.

Every file bench/results/<script>.json was written by `python bench/record.py <script> [ARGS]`: the
command, the date, the machine and its load, and the script's figures (its last JSON line). One section
per file, the figures flattened into a table (nested keys joined with "."). Used by `docs/hooks.py` while
the site builds; run alone it prints the page: `python docs/gen_numbers.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

PLACEHOLDER = "<!-- measured-numbers -->"
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, leaf) pairs of nested dicts; lists of numbers stay one cell."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, value)]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8:
        value = [*value[:8], "..."]
    return " ".join(str(value).split()).replace("|", "\\|")


def _runs_section(path: Path, entry: dict) -> str:
    """A file of several runs (`{"machine": text, "runs": [figures with a "label"]}`): one table, a row a run."""
    runs = entry["runs"]
    keys = [k for k, _ in flatten({k: v for k, v in runs[0].items() if k != "label"})]
    head = "| run | " + " | ".join(_cell(k) for k in keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = ""
    for run in runs:
        values = dict(flatten({k: v for k, v in run.items() if k != "label"}))
        rows += f"| {_cell(run.get('label', ''))} | " + " | ".join(_cell(values.get(k, "")) for k in keys) + " |\n"
    return f"## `bench/{path.stem}.py`\n\n{_cell(entry.get('machine', ''))}.\n\n" + head + rows


def numbers_markdown(results: Path = RESULTS) -> str:
    """One section per recorded benchmark, newest files' figures as they were written."""
    files = sorted(results.glob("*.json"))
    if not files:
        return "No benchmark has been recorded yet: run `python bench/record.py SCRIPT [ARGS]`.\n"
    parts = []
    for path in files:
        entry = json.loads(path.read_text())
        if "runs" in entry:  # several runs of one script kept side by side (e.g. before/after at several sizes)
            parts.append(_runs_section(path, entry))
            continue
        m = entry["machine"]
        devices = ", ".join(m.get("cuda_devices") or []) or "no GPU"
        load = " → ".join(f"{entry[k][0]:.1f}" for k in ("load_before", "load_after"))
        parts.append(f"## `{entry['script']}`\n\n`{entry['command']}`, {entry['date']}; {m['cpu_count']} CPUs "
                     f"({m['processor']}), {devices}, torch {m['torch']}; load average {load}.\n\n"
                     "| figure | value |\n|---|---|\n"
                     + "".join(f"| {_cell(k)} | {_cell(v)} |\n" for k, v in flatten(entry["figures"])))
    return "\n".join(parts)


if __name__ == "__main__":
    print(numbers_markdown())
