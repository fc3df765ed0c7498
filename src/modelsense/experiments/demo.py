"""`modelsense demo`: a short tour on digits that writes `report.html`.

Each capability of the package adds a section here; every section is a real run of the
corresponding command, written in its own run directory under the demo's `--out`.
"""

from __future__ import annotations

from pathlib import Path

from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.experiments.curvature import curvature_section
from modelsense.experiments.influence import noisy_labels_section
from modelsense.experiments.mpe import mpe_section
from modelsense.experiments.report import Section, write_report
from modelsense.experiments.representations import representations_section
from modelsense.experiments.memorization import memorization_section
from modelsense.experiments.train import run_train
from modelsense.models import ModelConfig
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig


def training_section(out: Path, progress: bool) -> Section:
    run = out / "train"
    metrics = run_train(DataConfig("digits"), ModelConfig("mlp"), TrainConfig(), run, progress=progress)
    return Section(
        "Training: MLP 64-128-128-10 on digits",
        "SGD with momentum 0.9, cosine schedule, prior precision δ = 1 (mean loss + δ/(2N)·||θ||²), "
        "minibatches reshuffled every epoch.",
        metrics,
        [run / "figures" / "learning_curves.png"],
        str(run),
    )


SECTIONS = {"train": training_section, "curvature": curvature_section, "mpe": mpe_section,
            "noisy-labels": noisy_labels_section, "memorization": memorization_section,
            "representations": representations_section}


def run_demo(out: str | Path = "demo_out", progress: bool = True, sections: list[str] | None = None) -> Path:
    """Run the demo sections (all by default, in order) and write `out/report.html`; returns its path."""
    names = list(SECTIONS) if not sections else sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(out)
    run = RunDir(out)
    run.write_config("demo", {"sections": names})
    sections = [SECTIONS[name](out, progress) for name in names]
    run.write_metrics({s.title: s.metrics for s in sections})
    return write_report(out / "report.html", "modelsense demo", sections)
