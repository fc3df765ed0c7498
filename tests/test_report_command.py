"""`modelsense report`: figures and report.html from finished run directories, drawn again from their
arrays without recomputing; several runs side by side; unfinished runs and unsafe --out refused."""

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.experiments.command import execute
from modelsense.experiments.curvature import BLR, BLRSpec
from modelsense.experiments.influence import NOISY_LABELS, NoisyLabelsSpec
from modelsense.experiments.representations import COMPARE, CompareSpec
from modelsense.experiments.runs_report import report_runs
from modelsense.experiments.train import TRAIN, TrainSpec
from modelsense.models import ModelConfig
from modelsense.runs import RunDir, run_status
from modelsense.training import TrainConfig

runner = CliRunner()
DATA = DataConfig(n_train=60)
NET = ModelConfig(widths=(8,))
FAST = TrainConfig(epochs=2, bs=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny finished runs of four commands (two of train), made with execute()."""
    root = tmp_path_factory.mktemp("runs")
    made = {"t0": root / "t0", "t1": root / "t1", "noisy": root / "noisy", "cmp": root / "cmp", "blr": root / "blr"}
    execute(TRAIN, TrainSpec(DATA, NET, FAST), made["t0"], progress=False)
    execute(TRAIN, TrainSpec(DATA, NET, replace(FAST, seed=1)), made["t1"], progress=False)
    execute(NOISY_LABELS, NoisyLabelsSpec(replace(DATA, corruption_ratio=0.2), NET, FAST, methods=("loss", "grad-dot")),
            made["noisy"], progress=False)
    execute(COMPARE, CompareSpec(DATA, NET, FAST), made["cmp"], progress=False)
    execute(BLR, BLRSpec(n_points=20, n_frequencies=4), made["blr"], progress=False)
    return made


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def images(html: str) -> list[str]:
    return re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", html)


def test_report_draws_figures_again_from_the_arrays(runs, tmp_path):
    """Figures come from the run's arrays and metrics, not from its figures/: with those deleted the report
    still has them; the inputs are left unchanged."""
    copies = {}
    for name in ("t0", "noisy", "cmp"):
        copies[name] = shutil.copytree(runs[name], tmp_path / "in" / name)
        shutil.rmtree(copies[name] / "figures")
    before = {n: snapshot(p) for n, p in copies.items()}
    path = report_runs([copies["t0"], copies["noisy"], copies["cmp"]], tmp_path / "rep")
    assert run_status(tmp_path / "rep") == "finished"
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["commands"] == ["train", "noisy-labels", "compare"]
    # learning curves; histograms and detection curves; the similarity heatmap
    assert metrics["figures_redrawn"] == 4 and metrics["figures_as_written"] == 0
    names = sorted(p.name for p in (tmp_path / "rep" / "figures").rglob("*.png"))
    assert names == sorted(["learning_curves.png", "self_influence_histograms.png", "detection_curves.png",
                            "similarity_cka.png"])
    html = path.read_text()
    shown = images(html)
    assert len(shown) == 4 and all(len(data) > 1000 for _, data in shown)
    assert {n: snapshot(p) for n, p in copies.items()} == before


def test_runs_side_by_side(runs, tmp_path):
    path = report_runs([runs["t0"], runs["t1"], runs["blr"]], tmp_path / "rep")
    html = path.read_text()
    assert "Runs side by side" in html
    header = re.search(r"<tr><th>metric</th><th>t0</th><th>t1</th><th>blr</th></tr>", html)
    assert header, "one column per run"
    accuracy = [json.loads((runs[n] / "metrics.json").read_text())["test_accuracy"] for n in ("t0", "t1")]
    row = re.search(r"<tr><td>test_accuracy</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
    assert row and [float(row.group(1)), float(row.group(2))] == pytest.approx(accuracy, rel=1e-3)
    assert row.group(3) == ""  # blr has no test accuracy
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    # two learning curves drawn again + their overlay; blr has no re-renderer: its figure as written
    assert metrics["figures_redrawn"] == 2 and metrics["figures_as_written"] == len(
        list((runs["blr"] / "figures").glob("*.png"))
    )
    assert (tmp_path / "rep" / "figures" / "compared" / "learning_curves.png").is_file()
    assert len(images(html)) == 3 + metrics["figures_as_written"]


def test_report_refuses_unfinished_runs_and_writes_nothing(runs, tmp_path):
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with RunDir.open(failed, "train", {}):
            raise RuntimeError("boom")
    assert run_status(failed) == "failed"
    crashed = shutil.copytree(runs["t0"], tmp_path / "crashed")
    (crashed / "metrics.json").unlink()  # marked running by no live process: a killed run
    assert run_status(crashed) == "crashed"
    (tmp_path / "empty").mkdir()
    for bad, words in ((failed, "failed"), (crashed, "killed"), (tmp_path / "nowhere", "not a folder"),
                       (tmp_path / "empty", "no config.json")):
        with pytest.raises(ConfigError, match=words):
            report_runs([runs["t0"], bad], tmp_path / "rep")
        assert not (tmp_path / "rep").exists()
    with pytest.raises(ConfigError, match="at least one"):
        report_runs([], tmp_path / "rep")
    with pytest.raises(ConfigError, match="twice"):
        report_runs([runs["t0"], runs["t0"]], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_report_never_writes_into_or_over_an_input(runs, tmp_path):
    run = shutil.copytree(runs["t0"], tmp_path / "t0")
    before = snapshot(run)
    for out in (run, tmp_path, run / "report"):
        with pytest.raises(ConfigError, match="input run"):
            report_runs([run], out, overwrite=True)
    assert snapshot(run) == before and not (run / "report").exists()


def test_a_demo_folder_stands_for_its_runs(runs, tmp_path):
    demo = tmp_path / "demo"
    with RunDir.open(demo, "demo", {"sections": ["train"]}) as run:
        shutil.copytree(runs["t0"], demo / "train")
        shutil.copytree(runs["cmp"], demo / "representations" / "compare")
        run.write_metrics({})
    report_runs([demo], tmp_path / "rep")
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert sorted(metrics["commands"]) == ["compare", "train"]


def test_cli_report(runs, tmp_path):
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(runs["t0"]), str(runs["noisy"]), "--out", str(out), "--quiet",
                              "--title", "two runs"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "<title>two runs</title>" in (out / "report.html").read_text()
    again = runner.invoke(app, ["report", str(runs["t0"]), "--out", str(out), "--quiet"])
    assert again.exit_code != 0 and "already holds" in str(again.exception)
    res = runner.invoke(app, ["report", str(runs["t0"]), "--out", str(out), "--overwrite", "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)


def test_learning_curves_compared_is_a_library_function():
    from modelsense.training.plots import learning_curves_compared

    history = {"epoch": [1, 2, 3], "test_loss": [1.0, 0.5, 0.4], "test_accuracy": [0.5, 0.7, 0.8]}
    fig = learning_curves_compared({"a": history, "b": {**history, "test_loss": list(np.array([2.0, 1.0, 0.9]))}})
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 0.5, 0.4], [2.0, 1.0, 0.9]]
    assert fig.axes[1].get_ylabel() == "test accuracy"


def test_every_renderer_imports_its_figures(tmp_path):
    """Each command's re-renderer imports its figure functions from where they live (a move of the
    figures out of experiments/ once left two of them pointing at a module that no longer existed):
    given a run folder without arrays, each returns no figure instead of failing."""
    from modelsense.experiments.runs_report import RENDERERS, StoredRun

    empty = StoredRun(tmp_path, "empty", "any", {}, {})
    for command, render in RENDERERS.items():
        assert render(empty) == [], command
