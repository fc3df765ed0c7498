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
from modelsense.runs import RunDir, finished_metrics
from modelsense.training.config import TrainConfig


def training_section(out: Path, progress: bool, resume: bool = False) -> Section:
    run = out / "train"
    metrics = (resume and finished_metrics(run)) or run_train(DataConfig("digits"), ModelConfig("mlp"), TrainConfig(), run,
                                                             progress=progress, overwrite=True)
    return Section(
        "Training: MLP 64-128-128-10 on digits",
        "SGD with momentum 0.9, cosine schedule, prior precision δ = 1 (mean loss + δ/(2N)·||θ||²), "
        "minibatches reshuffled every epoch.",
        metrics,
        [run / "figures" / "learning_curves.png"],
        str(run),
    )


#: section name -> (function(out, progress, resume) -> Section, its folder under the demo's --out)
SECTIONS = {"train": (training_section, "train"), "curvature": (curvature_section, "curvature"),
            "mpe": (mpe_section, "mpe_validation"), "noisy-labels": (noisy_labels_section, "noisy_labels"),
            "memorization": (memorization_section, "memorization"),
            "representations": (representations_section, "representations")}


def run_demo(out: str | Path = "demo_out", progress: bool = True, sections: list[str] | None = None,
             resume: bool = False, overwrite: bool = False) -> Path:
    """Run the demo sections (all by default, in order) and write `out/report.html`; returns its path.

    Each section is a real run of its command in a folder of `out`. `resume` reuses the sections that
    finished in an earlier demo into `out` and runs the others (an interrupted memorization farm
    continues from its chunks).
    """
    names = list(SECTIONS) if not sections else sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(out)
    keep = tuple(folder for _, folder in SECTIONS.values())
    with RunDir.open(out, "demo", {"sections": names}, resume=resume, overwrite=overwrite, keep=keep,
                     resume_keys=()) as run:
        done = [SECTIONS[name][0](out, progress, resume) for name in names]
        run.write_metrics({s.title: s.metrics for s in done})
        return write_report(out / "report.html", "modelsense demo", done)
