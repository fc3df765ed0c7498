"""`modelsense report RUN_DIR [RUN_DIR ...]`: figures and an HTML report from finished run directories.

Nothing is recomputed: each run's figures are drawn again by the plotting functions of its area
(`<area>/plots.py`, the functions the command itself used) from what the run holds — metrics.json and
the arrays it wrote (`history.npz`, `self_influence.npz`, `memorization.npy`, `similarity.npy`, ...) —
so a run made before a plotting fix gets the fixed figure. Commands without a re-renderer here
(`RENDERERS`) show the figures they wrote (`figures/*.png`) as they are. With several runs the report
starts with their metrics side by side (one column per run) and, for runs that hold a training history,
their learning curves overlaid. A `demo` folder stands for the runs it holds.

Every input must be a run directory that finished (`runs.require_finished`); an unfinished one (still
running, crashed, failed, interrupted) is refused before anything is written. The report is a run
directory itself (`--out`): report.html, figures/<run>/*.png, config.json (the inputs), metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute
from modelsense.runs import RunDir, read_json, require_finished, run_status

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ReportSpec:
    """`modelsense report`: the run directories to show, in order, and the report's title."""

    runs: tuple[str, ...] = ()
    title: str = "modelsense report"


@dataclass
class StoredRun:
    """A finished run directory as the report reads it."""

    path: Path
    label: str
    command: str
    config: dict[str, Any]
    metrics: dict[str, Any]

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def array(self, name: str) -> Any:
        """An array the run wrote (`name` with its suffix): np.load of it (an NpzFile for .npz)."""
        return np.load(self.path / name, allow_pickle=False)


# -- re-renderers: (stored run) -> [(figure name, Figure)], from arrays and metrics only ---------------
def _train(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.training import plots

    if not run.has("history.npz"):
        return []
    with run.array("history.npz") as f:
        history = {k: f[k].tolist() for k in f.files}
    model = run.config.get("model", {}).get("name", "model")
    data = run.config.get("data", {}).get("name", "")
    return [("learning_curves", plots.learning_curves(history, f"{model} on {data}" if data else model))]


def _method_scores(run: StoredRun, file: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with run.array(file) as f:
        stored = {k: f[k] for k in f.files}
    corrupted = stored.pop("corrupted", None)
    names = list(run.metrics.get("auc", {})) or list(stored)
    return {m: stored[m.replace("-", "_")] for m in names if m.replace("-", "_") in stored}, corrupted


def _noisy_labels(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.attribution import plots

    if not run.has("self_influence.npz"):
        return []
    scores, corrupted = _method_scores(run, "self_influence.npz")
    if not scores or corrupted is None:
        return []
    what = "self-influence" if run.config.get("score", "self") == "self" else "negated train-test influence"
    return [("self_influence_histograms", plots.self_influence_histograms(scores, corrupted, what)),
            ("detection_curves", plots.detection_curves(scores, corrupted))]


def _lds(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.attribution import plots

    needed = ("lds", "seconds", "alpha", "n_models")
    return [("lds", plots.lds_figure(run.metrics))] if all(k in run.metrics for k in needed) else []


def _relabel(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.attribution import plots

    return [("relabel", plots.relabel_figure(run.metrics))] if "budgets" in run.metrics else []


def _memorization(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.memorization import plots

    if not run.has("memorization.npy"):
        return []
    return [("memorization_histogram", plots.memorization_histogram(run.array("memorization.npy")))]


def _compare(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.representations import plots

    if not run.has("similarity.npy"):
        return []
    matrix = run.array("similarity.npy")
    layers = list(run.metrics.get("layers", []))
    rows = layers if len(layers) == matrix.shape[0] else [str(i) for i in range(matrix.shape[0])]
    cols = layers if len(layers) == matrix.shape[1] else [str(i) for i in range(matrix.shape[1])]
    metric = run.metrics.get("metric", "similarity")
    return [(f"similarity_{metric}", plots.similarity_heatmap(matrix, rows, cols, str(metric)))]


def _mpe_validation(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.mpe.plots import plot_validation

    if not run.has("validation.npz"):
        return []
    with run.array("validation.npz") as f:
        true, est = f["true_deviation"], f["estimated_deviation"]
    m = run.metrics
    return [("validation", plot_validation(true, est, f"{m.get('posterior', '')}, {m.get('mpe_variant', '')}",
                                           slope=m.get("slope"), pearson=m.get("pearson")))]


def _mpe_l2reg(run: StoredRun) -> list[tuple[str, Any]]:
    from modelsense.mpe.plots import plot_loo_l2reg

    if not run.has("loo_l2reg.npz"):
        return []
    with run.array("loo_l2reg.npz") as f:
        return [("loo_l2reg", plot_loo_l2reg(f["deltas"], f["estimated_nll"], f["test_nll"]))]


#: command -> its re-renderer; other commands show the figures they wrote
RENDERERS: dict[str, Callable[[StoredRun], list[tuple[str, Any]]]] = {
    "train": _train, "zoo": _train, "noisy-labels": _noisy_labels, "lds": _lds, "relabel": _relabel,
    "memorization": _memorization, "compare": _compare, "mpe validation": _mpe_validation,
    "mpe loo-l2reg": _mpe_l2reg,
}


# -- reading the inputs -----------------------------------------------------------------------------
def _nested_runs(path: Path) -> list[Path]:
    """The run directories inside a demo folder, in a stable order."""
    return sorted(p.parent for p in path.rglob("config.json") if p.parent != path)


def read_run(path: Path, label: str) -> StoredRun:
    """The finished run in `path` (ConfigError when it is none, or did not finish)."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give run directories (folders with a config.json), "
                          "e.g. the --out of a modelsense command")
    if run_status(path) is None:
        raise ConfigError(f"{path} holds no modelsense run (no config.json); give the --out folder of a command")
    require_finished(path, f"report input {path}")
    config = read_json(path / "config.json", "the config of the run")
    metrics = RunDir(path).read_metrics()
    metrics.pop("status", None)
    return StoredRun(path, label, str(config.get("command", "?")), config, metrics)


def _labels(paths: list[Path]) -> list[str]:
    """Short, distinct labels: the folder names, or the paths where names repeat."""
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def check_report(spec: ReportSpec) -> Prepared:
    if not spec.runs:
        raise ConfigError("give at least one run directory: modelsense report RUN_DIR [RUN_DIR ...] --out DIR")
    paths: list[Path] = []
    for given in spec.runs:
        path = Path(given)
        run = read_run(path, str(path))
        if run.command == "demo":
            inner = [p for p in _nested_runs(path)]
            for p in inner:
                require_finished(p, f"report input {p} (in the demo folder {path})")
            paths.extend(inner)
        else:
            paths.append(path)
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise ConfigError("a run directory is given twice (directly or inside a demo folder); give each once")
    runs = [read_run(p, label) for p, label in zip(paths, _labels(paths))]
    return Prepared(None, {"inputs": [str(p.resolve()) for p in paths]}, {"runs": runs})


def check_out(out: str | Path, runs: tuple[str, ...] | list[str]) -> None:
    """ConfigError when --out is an input run, holds one (--overwrite would delete it) or lies inside one."""
    target = Path(out).resolve()
    for given in runs:
        if run_status(given) is None:
            continue  # no run: check_report refuses it
        inner = _nested_runs(Path(given))
        for path in (Path(given).resolve(), *(p.resolve() for p in inner)):
            if target == path or target in path.parents or path in target.parents:
                raise ConfigError(f"--out {out} is, holds or lies inside the input run {given}; write the report "
                                  "elsewhere")


# -- the report -------------------------------------------------------------------------------------
def _plain_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar metrics, nested dictionaries flattened one level ("auc.gex"); long lists left out."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(_plain_metrics(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        elif isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[key] = v
    return out


def side_by_side(runs: list[StoredRun]) -> list[list[Any]]:
    """A table: header (metric, run labels...), then one row per metric any run reports ("" where a run lacks it)."""
    flat = [_plain_metrics(r.metrics) for r in runs]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    return [["metric", *(r.label for r in runs)], ["command", *(r.command for r in runs)],
            *([k, *(f.get(k, "") for f in flat)] for k in keys)]


def run_report(spec: ReportSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Draw each run's figures again (or take the ones it wrote), then write report.html."""
    from modelsense.report import Section, write_report
    from modelsense.training import plots

    runs: list[StoredRun] = prepared.extra["runs"]
    sections: list[Section] = []
    redrawn = copied = 0
    if len(runs) > 1:
        figures = []
        histories = {}
        for r in runs:
            if r.has("history.npz"):
                with r.array("history.npz") as f:
                    histories[r.label] = {k: f[k].tolist() for k in f.files}
        if len(histories) > 1:
            figures.append(run.save_figure(plots.learning_curves_compared(histories), "compared/learning_curves"))
        sections.append(Section("Runs side by side", f"{len(runs)} runs; the metrics each wrote (metrics.json).",
                                figures=figures, table=side_by_side(runs)))
    for i, r in enumerate(runs):
        folder = f"{i:02d}_{r.path.name or 'run'}"
        renderer = RENDERERS.get(r.command)
        drawn = renderer(r) if renderer is not None else []
        paths = [run.save_figure(fig, f"{folder}/{name}") for name, fig in drawn]
        redrawn += len(paths)
        if not paths:  # as the command drew them
            paths = sorted((r.path / "figures").glob("*.png")) if (r.path / "figures").is_dir() else []
            copied += len(paths)
        how = ("figures drawn again from the run's arrays and metrics" if drawn else
               "figures as the run wrote them" if paths else "no figures")
        sections.append(Section(f"{r.command}: {r.label}", f"modelsense {r.command}; {how}.",
                                _plain_metrics(r.metrics), paths, str(r.path)))
    path = write_report(run.path / REPORT_FILE, spec.title, sections)
    run.log(f"report of {len(runs)} runs: {redrawn} figures drawn again, {copied} as written -> {path}")
    return {"n_runs": len(runs), "commands": [r.command for r in runs], "figures_redrawn": redrawn,
            "figures_as_written": copied}


REPORT = Command("report", ReportSpec, check_report, run_report,
                 summary=lambda m: f"{m['n_runs']} runs: {m['figures_redrawn']} figures drawn again, "
                                   f"{m['figures_as_written']} as written",
                 help="Figures and an HTML report (OUT/report.html) from finished run directories, without "
                      "recomputing; several runs side by side.")


def report_runs(runs: list[str | Path], out: str | Path, *, title: str = "modelsense report", overwrite: bool = False,
                progress: bool = False) -> Path:
    """Write the report of `runs` (run directories, or demo folders) into the run directory `out`; returns
    the path of its report.html."""
    spec = ReportSpec(tuple(str(r) for r in runs), title)
    check_out(out, spec.runs)
    execute(REPORT, spec, out, overwrite=overwrite, progress=progress)
    return Path(out) / REPORT_FILE


__all__ = ["REPORT", "RENDERERS", "ReportSpec", "StoredRun", "check_out", "read_run", "report_runs",
           "side_by_side"]
