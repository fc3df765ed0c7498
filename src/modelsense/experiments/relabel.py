"""`modelsense relabel`: relabel the training examples a method ranks as most likely mislabeled, retrain
from scratch, and compare the test accuracy with relabeling at random and with no relabeling.

For each method (ranking by self-influence, as `noisy-labels`) and each budget b — a number of
examples, or `otsu`: the examples whose score exceeds Otsu's threshold of the method's score
histogram (`attribution.selection.otsu_threshold`) — the b highest-ranked training examples get the
target label (`--target`):

    out-of-fold   (default) the most probable label under out-of-fold predictions: the `cl` method's
                  k models of the training recipe (`--cl-folds`, default 2), each trained without
                  the fold it predicts, so no model saw the example it relabels; a flagged example
                  whose out-of-fold prediction is its own label keeps it.
    other         the trained model's most probable label other than the given one (no training;
                  the label always changes).
    prediction    the trained model's most probable label. A model that memorised its training
                  labels predicts them: on digits with 10% noise (MLP, 200 epochs, train accuracy
                  0.999) it changes 1 of 130 corrupted labels, where `other` restores 89% and
                  `out-of-fold` 92% of them. Ensembles of models that trained on the example
                  (gex's fine-tuned members, trak's) memorise it the same way, hence out-of-fold.

Each relabeled training set is a job of the ground-truth store (all N examples, the recipe's
seed, its own labels: `retraining.store.Job.labels`), so `--resume` and a shared `--store` reuse the
models. Baselines: the same budgets relabeled at random (`--n-random` draws, the same target rule),
no relabeling, and (with corrupted labels) the clean labels (every corruption undone: the ceiling).

The GEX code (relabel/main.py) computes the Otsu mask and then leaves it unused: it retrains on the
pretrained model's predicted probabilities of *every* example as soft labels (self-distillation,
not a selective relabeling); the engine trains on class labels, so that is not reproduced here
(`--target prediction` with a budget of N is its hard-label counterpart).

Metrics: `none_accuracy`, `clean_accuracy`, `budgets`, `accuracy` {method: [per budget]},
`random_accuracy` (+ `_std`) per budget, `otsu` {method: threshold, budget, accuracy,
random_accuracy}, `precision` / `corrected` {method: [per budget]} (fraction of the relabeled
examples that were corrupted; fraction of the corrupted examples whose clean label is restored),
`target_accuracy` (fraction of corrupted examples whose target is their clean label), `best`
{method: budget, accuracy, gain over none and over random}. Figure: figures/relabel.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from modelsense.attribution import parse_methods
from modelsense.attribution.selection import (
    best_budgets,
    otsu_threshold,
    relabel_quality,
    relabel_targets,
    relabeled,
)
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared
from modelsense.experiments.influence import (
    NOISY_TRAIN,
    MethodSettings,
    _check_self_influence,
    _fit_method,
    _methods_help,
    _obtain,
    _prepare,
)
from modelsense.experiments.source import CHECKPOINT_HELP, WEIGHTS_HELP
from modelsense.models import ModelConfig
from modelsense.options import joined, names, option
from modelsense.retraining.store import (
    STORE_DIR,
    Job,
    RetrainOptions,
    RetrainRecipe,
    retrain,
)
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.objective import LOSSES

TARGETS = ("out-of-fold", "other", "prediction")
OTSU = "otsu"
#: the default budgets: these fractions of N, and Otsu's threshold
DEFAULT_FRACTIONS = (0.05, 0.1, 0.15, 0.2)


@dataclass(frozen=True)
class RelabelSpec:
    """`modelsense relabel`: relabel the highest self-influence examples, retrain, compare."""

    data: DataConfig = field(default_factory=lambda: DataConfig(corruption_ratio=0.1))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**NOISY_TRAIN))
    methods: tuple[str, ...] = option(("gex", "loss"), _methods_help(" (ranking by self-influence)"), parse=names,
                                      show=joined)
    budgets: tuple[str, ...] = option((), "comma-separated numbers of examples to relabel, and/or otsu (the examples "
                                          "above Otsu's threshold of each method's scores); default 5,10,15,20% of N "
                                          "and otsu", parse=names, show=joined)
    target: str = option("out-of-fold", "the new label: out-of-fold (prediction of models that never saw the example, "
                                        "--cl-folds), other (the model's most probable other label) or prediction "
                                        "(the model's most probable label)")
    n_random: int = option(3, "random-relabeling repeats per budget")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    weights: str | None = option(None, WEIGHTS_HELP)


def check_relabel(spec: RelabelSpec) -> Prepared:
    """Validate the relabel options (target, budgets in (0, N] or otsu) and load the data."""
    methods = parse_methods(list(spec.methods))
    _check_self_influence(methods)
    if spec.target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, received {spec.target!r}")
    if spec.n_random < 1:
        raise ConfigError(f"--n-random must be >= 1, received {spec.n_random}")
    numbers, otsu = [], False
    for b in spec.budgets:
        if str(b).strip().lower() == OTSU:
            otsu = True
            continue
        try:
            numbers.append(int(b))
        except ValueError:
            raise ConfigError(f"--budgets takes numbers of examples and otsu, received {b!r}") from None
    # out-of-fold targets come from the `cl` method: its settings (--cl-folds) are asked for too
    needed = methods + (["cl"] if spec.target == "out-of-fold" and "cl" not in methods else [])
    prepared = _prepare(spec, needed)
    n = prepared.data.n_train
    if not spec.budgets:
        numbers, otsu = [max(1, round(f * n)) for f in DEFAULT_FRACTIONS], True
    bad = [b for b in numbers if not 0 < b <= n]
    if bad:
        raise ConfigError(f"--budgets must lie in (0, N={n}], received {bad}")
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"--budgets names a budget twice: {numbers}")
    RetrainRecipe(spec.data, spec.model, spec.train)  # retraining is the engine's (sgd or adam)
    prepared.config.update(budgets=sorted(numbers), otsu=otsu)
    prepared.extra["ranked"] = methods
    return prepared


def _targets(spec: RelabelSpec, got, prepared: Prepared, progress: bool, fitted: dict[str, Any]) -> np.ndarray:
    """The target label of every training example (see the module docstring)."""
    from modelsense.core.functional import chunks
    from modelsense.core.likelihood import likelihood_for

    data = prepared.data
    if spec.target == "out-of-fold":
        att = fitted.get("cl") or _fit_method("cl", got, prepared, progress)[0]
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

    data = prepared.data
    n, budgets = data.n_train, prepared.config["budgets"]
    y = data.y_train.numpy().astype(np.int64)
    corrupted = data.metadata.get("corrupted_indices")
    corrupted = np.asarray(corrupted if corrupted is not None else [], dtype=np.int64)
    clean = data.metadata.get("original_y_train")
    got = _obtain(prepared, run, progress)
    seed = got.train.seed
    metrics: dict[str, Any] = {"train_accuracy": got.fit.final.get("train_accuracy"), "n_train": n,
                               "n_corrupted": len(corrupted), "target": spec.target, "budgets": budgets,
                               "seconds": {}, "accuracy": {}, "otsu": {}}
    fitted, ranks = {}, {}
    for m in prepared.extra["ranked"]:
        att, metrics["seconds"][m] = _fit_method(m, got, prepared, progress)
        fitted[m] = att
        s = att.self_scores().double().numpy()
        ranks[m] = (s, np.argsort(-s, kind="stable"))
        run.log(f"{m}: self-influence in {metrics['seconds'][m]:.1f}s")
    start = time.perf_counter()
    targets = _targets(spec, got, prepared, progress, fitted)
    metrics["target_seconds"] = time.perf_counter() - start
    if len(corrupted):
        metrics["target_accuracy"] = float((targets[corrupted] == clean.numpy()[corrupted]).mean())

    # the jobs: (what, method, budget) -> a relabeled training set; all on N examples with the recipe's seed
    labelled: list[tuple[str, str, int]] = []
    sets: list[np.ndarray | None] = []
    chosen_sets: list[np.ndarray] = []

    def add(what: str, method: str, budget: int, chosen: np.ndarray) -> None:
        labelled.append((what, method, budget))
        labels = relabeled(y, chosen, targets)
        sets.append(None if np.array_equal(labels, y) else labels)  # unchanged: the job of no relabeling
        chosen_sets.append(chosen)

    for m, (s, order) in ranks.items():
        for b in budgets:
            add("method", m, b, order[:b])
        if prepared.config["otsu"]:
            t = otsu_threshold(s)
            flagged = np.flatnonzero(s > t)
            metrics["otsu"][m] = {"threshold": t, "budget": len(flagged)}
            if len(flagged):
                add("otsu", m, len(flagged), flagged)
    random_budgets = sorted({*budgets, *(o["budget"] for o in metrics["otsu"].values() if o["budget"])})
    rng = np.random.default_rng(seed + 99)
    for _ in range(spec.n_random):
        for b in random_budgets:
            add("random", "random", b, rng.choice(n, size=b, replace=False))
    labelled.append(("none", "none", 0))
    sets.append(None)
    chosen_sets.append(np.zeros(0, dtype=np.int64))
    if len(corrupted):
        labelled.append(("clean", "clean", len(corrupted)))
        sets.append(clean.numpy().astype(np.int64))
        chosen_sets.append(corrupted)

    recipe = RetrainRecipe(spec.data, got.model, replace(got.train, checkpoint_epochs=(), checkpoint_iterations=()))
    jobs = [Job(np.ones(n, dtype=bool), seed, labels) for labels in sets]
    tables = retrain(recipe, jobs, spec.retrain, run.path, data=data, progress=progress, log=run.log)
    acc = tables["test_correct"].astype(np.float64).mean(1)

    def accuracy(what: str, method: str, budget: int) -> list[float]:
        return [float(a) for (w, mm, b), a in zip(labelled, acc) if (w, mm, b) == (what, method, budget)]

    metrics["none_accuracy"] = accuracy("none", "none", 0)[0]
    if len(corrupted):
        metrics["clean_accuracy"] = accuracy("clean", "clean", len(corrupted))[0]
    rand = {b: np.array(accuracy("random", "random", b)) for b in random_budgets}
    metrics["random_accuracy"] = [float(rand[b].mean()) for b in budgets]
    metrics["random_accuracy_std"] = [float(rand[b].std()) for b in budgets]
    for m in ranks:
        metrics["accuracy"][m] = [accuracy("method", m, b)[0] for b in budgets]
        if m in metrics["otsu"] and metrics["otsu"][m]["budget"]:
            b = metrics["otsu"][m]["budget"]
            metrics["otsu"][m].update(accuracy=accuracy("otsu", m, b)[0], random_accuracy=float(rand[b].mean()))
    if len(corrupted):
        metrics["precision"], metrics["corrected"] = {}, {}
        for (what, m, _b), chosen, labels in zip(labelled, chosen_sets, sets):
            if what not in ("method", "otsu"):
                continue
            precision, corrected = relabel_quality(chosen, y if labels is None else labels, corrupted, clean.numpy())
            if what == "otsu":
                metrics["otsu"][m].update(precision=precision, corrected=corrected)
            else:
                metrics["precision"].setdefault(m, []).append(precision)
                metrics["corrected"].setdefault(m, []).append(corrected)
    metrics["best"] = best_budgets(metrics["accuracy"], budgets, metrics["random_accuracy"], metrics["none_accuracy"],
                                   metrics["otsu"])
    run.save_arrays("relabel", **{k.replace("-", "_"): v[0] for k, v in ranks.items()}, targets=targets,
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
