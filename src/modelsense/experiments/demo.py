"""`modelsense demo`: a short tour on digits that writes `report.html`.

Each capability of the package adds a section here; every section is a real run of the
corresponding command, written in its own run directory under the demo's `--out`.
"""

from __future__ import annotations

from pathlib import Path

from modelsense.errors import ConfigError, ModelsenseError
from modelsense.experiments.command import execute_or_reuse
from modelsense.experiments.curvature import curvature_section
from modelsense.experiments.influence import noisy_labels_section
from modelsense.experiments.memorization import memorization_section
from modelsense.experiments.mpe import mpe_section
from modelsense.experiments.representations import representations_section
from modelsense.experiments.train import TRAIN, TrainSpec
from modelsense.report import Section, write_report
from modelsense.runs import RunDir, read_json, write_json


def training_section(out: Path, progress: bool, resume: bool = False) -> Section:
    """The demo's training section: trains the MLP into out/train (or reuses it with `resume` when finished)."""
    run = out / "train"
    metrics = execute_or_reuse(TRAIN, TrainSpec(), run, resume=resume, progress=progress)
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


#: The sections the report of a demo folder shows, kept between runs (name -> title, text, metrics, figures, run_dir).
SECTIONS_FILE = "sections.json"


def _save_sections(out: Path, sections: dict[str, Section]) -> None:
    def rel(p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)

    write_json(out / SECTIONS_FILE, {name: {"title": s.title, "text": s.text, "metrics": s.metrics,
                                            "figures": [rel(f) for f in s.figures], "run_dir": s.run_dir}
                                     for name, s in sections.items()})


def _load_sections(out: Path) -> dict[str, Section]:
    """The sections an earlier demo wrote into `out`, those whose figures are still there."""
    path = out / SECTIONS_FILE
    if not path.is_file():
        return {}
    try:
        saved = read_json(path)
        sections = {name: Section(d["title"], d["text"], d["metrics"], [out / f for f in d["figures"]], d["run_dir"])
                    for name, d in saved.items() if name in SECTIONS}
    except (ValueError, KeyError, TypeError, AttributeError, ModelsenseError):
        return {}  # unreadable: the sections run now make the report
    return {name: s for name, s in sections.items() if all(Path(f).is_file() for f in s.figures)}


def run_demo(out: str | Path = "demo_out", progress: bool = True, sections: list[str] | None = None,
             resume: bool = False, overwrite: bool = False) -> Path:
    """Run the demo sections (all by default, in order) and write `out/report.html`; returns its path.

    Each section is a real run of its command in a folder of `out`. `resume` reuses the sections that
    finished in an earlier demo into `out` and runs the others (an interrupted memorization farm
    continues from its chunks). The report also shows the sections that earlier demos wrote into
    `out` and this one did not run (`sections.json`): `--sections train --resume` after a full demo
    keeps the other sections.
    """
    names = list(SECTIONS) if not sections else sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(out)
    keep = (*(folder for _, folder in SECTIONS.values()), SECTIONS_FILE)
    kept = {} if overwrite else _load_sections(out)
    with RunDir.open(out, "demo", {"sections": names}, resume=resume, overwrite=overwrite, keep=keep,
                     resume_keys=()) as run:
        kept.update({name: SECTIONS[name][0](out, progress, resume) for name in names})
        shown = {name: kept[name] for name in SECTIONS if name in kept}
        _save_sections(out, shown)
        run.write_metrics({s.title: s.metrics for s in shown.values()})
        return write_report(out / "report.html", "modelsense demo", list(shown.values()))
