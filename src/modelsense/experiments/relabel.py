"""`modelsense relabel`: relabel the training examples a method ranks as most likely mislabeled, retrain
from scratch, and compare the test accuracy with relabeling at random and with no relabeling.

For each method (ranking by self-influence, as `noisy-labels`) and each budget b — a number of
examples, or `otsu`: the examples whose score exceeds Otsu's threshold of the method's score
histogram (`attribution.selection.otsu_threshold`) — the b highest-ranked training examples get the
target label (`--target`): out-of-fold (default: the predictions of `cl`'s k models, each trained
without the fold it predicts), other (the trained model's most probable other label) or prediction
(its most probable label, which a model that memorised its labels rarely changes); see
`attribution.selection.relabel_targets`. Each relabeled training set (`RelabelPlan`: the budgets,
Otsu's, `--n-random` random draws of each budget, no relabeling and, with corrupted labels, the clean
labels) is a job of the ground-truth store (all N examples, the recipe's seed, its own labels), so
`--resume` and a shared `--store` reuse the models.

The GEX code (relabel/main.py) computes the Otsu mask and then leaves it unused: it retrains on the
pretrained model's predicted probabilities of *every* example as soft labels (self-distillation,
not a selective relabeling); the engine trains on class labels, so that is not reproduced here
(`--target prediction` with a budget of N is its hard-label counterpart).

Metrics (`RelabelPlan.results`): `none_accuracy`, `clean_accuracy`, `budgets`, `accuracy` {method: [per
budget]}, `random_accuracy` (+ `_std`), `otsu`, `precision` / `corrected`, `target_accuracy` (fraction
of corrupted examples whose target is their clean label), `best`. Figure: figures/relabel.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from modelsense.attribution import parse_methods
from modelsense.attribution.selection import RelabelPlan, relabel_targets
from modelsense.attribution.settings import MethodSettings, check_self_influence
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.experiments import influence, source
from modelsense.experiments.command import Command, Prepared
from modelsense.options import joined, names, option
from modelsense.retraining.store import STORE_DIR, Job, RetrainOptions, RetrainRecipe, retrain
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.objective import LOSSES

TARGETS = ("out-of-fold", "other", "prediction")
OTSU = "otsu"
#: the default budgets: these fractions of N, and Otsu's threshold
DEFAULT_FRACTIONS = (0.05, 0.1, 0.15, 0.2)


@dataclass(frozen=True)
class RelabelSpec(influence.InfluenceCommandSpec):
    """`modelsense relabel`: relabel the highest self-influence examples, retrain, compare."""

    data: DataConfig = field(default_factory=lambda: DataConfig(corruption_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**influence.NOISY_TRAIN))
    methods: tuple[str, ...] = option(("gex", "loss"), influence.methods_help(" (ranking by self-influence)"),
                                      parse=names, show=joined)
    budgets: tuple[str, ...] = option((), "comma-separated numbers of examples to relabel, and/or otsu (the examples "
                                          "above Otsu's threshold of each method's scores); default 5,10,15,20% of N "
                                          "and otsu", parse=names, show=joined)
    target: str = option("out-of-fold", "the new label: out-of-fold (prediction of models that never saw the example, "
                                        "--cl-folds), other (the model's most probable other label) or prediction "
                                        "(the model's most probable label)", choices=TARGETS)
    n_random: int = option(3, "random-relabeling repeats per budget", low=1)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, source.CHECKPOINT_HELP)
    weights: str | None = option(None, source.WEIGHTS_HELP)


def check_relabel(spec: RelabelSpec) -> Prepared:
    """Validate the relabel options (budgets in (0, N] or otsu) and load the data."""
    methods = parse_methods(list(spec.methods))
    check_self_influence(methods)
    numbers = []
    for b in spec.budgets:
        if str(b).strip().lower() != OTSU:
            try:
                numbers.append(int(b))
            except ValueError:
                raise ConfigError(f"--budgets takes numbers of examples and otsu, received {b!r}") from None
    # out-of-fold targets come from the `cl` method: its settings (--cl-folds) are asked for too
    cl = ["cl"] if spec.target == "out-of-fold" and "cl" not in methods else []
    prepared = influence.prepare(spec, methods + cl)
    n = prepared.data.n_train
    otsu = len(numbers) < len(spec.budgets) or not spec.budgets
    numbers = numbers if spec.budgets else [max(1, round(f * n)) for f in DEFAULT_FRACTIONS]
    bad = [b for b in numbers if not 0 < b <= n]
    if bad:
        raise ConfigError(f"--budgets must lie in (0, N={n}], received {bad}")
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"--budgets names a budget twice: {numbers}")
    prepared.config.update(budgets=sorted(numbers), otsu=otsu)
    prepared.extra["ranked"] = methods
    return prepared


def _targets(spec: RelabelSpec, got, prepared: Prepared, progress: bool, fitted: dict[str, Any]) -> np.ndarray:
    """The target label of every training example (see the module docstring)."""
    from modelsense.core.functional import chunks
    from modelsense.core.likelihood import likelihood_for

    data = prepared.data
    if spec.target == "out-of-fold":
        att = fitted.get("cl") or influence.fit_method("cl", got, prepared, progress)[0]
        probabilities = att.oof_probabilities_.detach().cpu().double().numpy()
    else:
        module, device = got.module.eval(), next(got.module.parameters()).device
        with torch.no_grad():
            logits = torch.cat([module(data.x_train[s].to(device)).cpu() for s in chunks(data.n_train, 4096)])
        probabilities = likelihood_for("categorical", got.train.loss).mean(logits.double()).numpy()
    return relabel_targets(probabilities, data.y_train.numpy(), spec.target)


def run_relabel(spec: RelabelSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Rank, relabel at each budget, retrain (jobs of the ground-truth store), compare (module docstring)."""
    from modelsense.attribution import plots

    data, budgets = prepared.data, prepared.config["budgets"]
    y = data.y_train.numpy().astype(np.int64)
    corrupted = data.metadata.get("corrupted_indices")
    corrupted = np.asarray(corrupted if corrupted is not None else [], dtype=np.int64)
    clean = data.metadata.get("original_y_train")
    clean = None if clean is None else clean.numpy()
    got = influence.obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"train_accuracy": got.fit.final.get("train_accuracy"), "n_train": data.n_train,
                               "n_corrupted": len(corrupted), "target": spec.target, "budgets": budgets, "seconds": {}}
    fitted, scores = {}, {}
    for m in prepared.extra["ranked"]:
        fitted[m], metrics["seconds"][m] = influence.fit_method(m, got, prepared, progress)
        scores[m] = fitted[m].self_scores().double().numpy()
        run.log(f"{m}: self-influence in {metrics['seconds'][m]:.1f}s")
    start = time.perf_counter()
    targets = _targets(spec, got, prepared, progress, fitted)
    metrics["target_seconds"] = time.perf_counter() - start
    if len(corrupted):
        metrics["target_accuracy"] = float((targets[corrupted] == clean[corrupted]).mean())
    plan = RelabelPlan.build(scores, y, targets, budgets, rng=np.random.default_rng(got.train.seed + 99),
                             otsu=prepared.config["otsu"], n_random=spec.n_random, corrupted=corrupted, clean=clean)
    recipe = RetrainRecipe(spec.data, got.model, replace(got.train, checkpoint_epochs=(), checkpoint_iterations=()))
    # all on N examples with the recipe's seed; unchanged labels: the job of no relabeling
    jobs = [Job(np.ones(data.n_train, dtype=bool), got.train.seed, None if np.array_equal(labels, y) else labels)
            for labels in plan.labels]
    acc = retrain(recipe, jobs, spec.retrain, run.path, data=data, progress=progress,
                  log=run.log)["test_correct"].astype(np.float64).mean(1)
    metrics.update(plan.results(acc, corrupted, clean))
    run.save_arrays("relabel", **influence.arrays_by_method(scores), targets=targets,
                    job_test_accuracy=acc, corrupted=corrupted)
    run.save_figure(plots.relabel_figure(metrics), "relabel")
    return metrics

def _summary(m: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table("method", *map(str, m["budgets"]), "otsu (budget)", "best gain vs none / random")
    for name, accs in m["accuracy"].items():
        o, best = m["otsu"].get(name, {}), m["best"][name]
        table.add_row(name, *(f"{a:.4f}" for a in accs),
                      f"{o['accuracy']:.4f} ({o['budget']})" if "accuracy" in o else "-",
                      f"{best['gain_over_none']:+.4f} / {best['gain_over_random']:+.4f} (b={best['budget']})")
    table.add_row("random", *(f"{a:.4f}" for a in m["random_accuracy"]), "", "")
    extra = f", clean labels {m['clean_accuracy']:.4f}" if "clean_accuracy" in m else ""
    from rich.console import Group

    return Group(f"no relabeling {m['none_accuracy']:.4f}{extra}; target {m['target']}", table)


RELABEL = Command("relabel", RelabelSpec, check_relabel, run_relabel, summary=_summary, keep=(STORE_DIR,),
                  resume_keys=("data", "model", "train", "methods", "budgets", "target", "n_random", "settings"),
                  training_losses=LOSSES,
                  help="Relabeling: relabel the highest self-influence examples of each method (budgets, Otsu's "
                       "threshold), retrain, test accuracy vs random relabeling and none.")
