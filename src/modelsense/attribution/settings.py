"""The attribution methods' shared settings (`MethodSettings`, the options of the influence commands)
and an attributor built on a training run: the context a method takes from the run that trained the
model (`method_context`, by what its class `needs`), combined with the shared settings (`make_method`).

    >>> settings = MethodSettings(proj_dim=512).for_methods(["randproj", "gex"])   # a bad or unused one fails
    >>> ctx = method_context("tracin", fit_result, train_cfg, model_cfg, data)   # checkpoints, learning rates
    >>> att = make_method("tracin", settings, ctx, progress=False, seed=0).fit(model, x_train, y_train)
    >>> att = method_for_run("tracin", settings, fit_result, train_cfg, model_cfg, data)   # the two in one
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from modelsense.attribution.base import make_attributor, method_class
from modelsense.attribution.gradient import checkpoints_from_fit
from modelsense.data import Dataset
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.options import check_fields, flag_of, option
from modelsense.training.config import TrainConfig

#: MethodSettings field -> the attribution setting it fills, where the names differ
_SETTING_NAMES = {"arnoldi_rank": "rank", "ensemble_models": "n_models", "bs_jacs": "chunk_size",
                  "memory_gb": "memory_budget"}


@dataclass(frozen=True)
class MethodSettings:
    """Settings of the attribution methods, shared by the influence commands; None: the method's
    default. Each method takes those it understands (`modelsense.attribution.method_settings`)."""

    num_ens: int | None = option(None, "ensemble members: gex fine-tuning runs, la-kfac samples")
    ft_lr: float | None = option(None, "gex: peak learning rate of each fine-tuning run")
    ft_step: int | None = option(None, "gex: SGD steps per fine-tuning run")
    ft_lr_sched: str | None = option(None, "gex: cosine (restarted, to 0) or constant (with clipping)")
    gex_eps: float | None = option(None, "gex/la-kfac: floor τ of the reference loss max(l(θ*), τ); 0 = none (the GEX "
                                         "code of Kim et al. 2023: 0.05)")
    proj_dim: int | None = option(None, "projection dimension of randproj, tracin-rp, trak")
    damping: float | None = option(None, "if-*/trak/arnoldi damping (if-*/trak: relative to the mean eigenvalue)")
    damping_mode: str | None = option(None, "relative (× mean eigenvalue) or absolute")
    matrix: str | None = option(None, "curvature of if-*/arnoldi: ggn, hessian or ef")
    mc_samples: int | None = option(None, "if-kfac/if-ekfac: Monte-Carlo targets per example for the GGN factors "
                                          "(an unbiased estimate at k backward passes instead of one per class, "
                                          "kronfluence's default is 1); default 0: the exact GGN", low=0)
    arnoldi_rank: int | None = option(None, "arnoldi: number of eigendirections")
    ensemble_models: int | None = option(None, "trak and if-*: models whose scores are averaged, the trained model "
                                                "and M − 1 trained from scratch (trak default 10, if-* 1 = the "
                                                "trained model only)")
    el2n_repeat: int | None = option(None, "el2n: early-trained models")
    el2n_epochs: int | None = option(None, "el2n: epochs of each early-trained model (default 10% of --epochs)")
    el2n_score: str | None = option(None, "el2n: brier (summed squared error, the GEX code's; default) or l2 (the norm "
                                          "of the error, Paul et al. 2021)")
    cl_folds: int | None = option(None, "cl: folds of the out-of-fold predictions (default 2, as the GEX code)")
    cl_score: str | None = option(None, "cl: self_confidence (1 − p of the given label, the GEX code's; default) or "
                                        "margin (with the per-class thresholds of Northcutt et al. 2021)")
    knn_k: int | None = option(None, "knn: neighbours (default N / classes, as the GEX code)")
    knn_space: str | None = option(None, "knn: features (penultimate layer; default) or logits (the GEX code's)")
    loss: str | None = option(None, "loss the methods score with: cross_entropy or sigmoid_bce (gradient/ensemble "
                                    "methods only); default: the model's training loss (--loss)", flag="--score-loss")
    bs_jacs: int | None = option(None, "examples per vmapped per-example gradient pass (default: as many as fit in "
                                       "memory-gb / 8)")
    memory_gb: float = option(2.0, "memory budget in GiB: score matrices larger than this go to a memory-mapped file",
                              above=0, below=float("inf"))
    spill: str | None = option(None, "auto (default), on or off: training features (per-example gradients, trak's "
                                     "projections) above a quarter of --memory-gb are written once to an unlinked "
                                     "scratch file under $MODELSENSE_SCRATCH (or the temp dir) instead of being "
                                     "recomputed for every block of test rows; auto stops when recomputing is faster",
                               choices=("auto", "on", "off"))
    precision: str | None = option(None, "dtype of the per-example gradient passes: full (default), bfloat16 or "
                                         "float16 (accumulated in the model's dtype)")

    def __post_init__(self) -> None:
        check_fields(self)

    def as_dict(self) -> dict[str, Any]:
        """The settings given, under the names of `modelsense.attribution` (None: left to the method);
        `memory_gb` as `memory_budget` in bytes, `spill` on/off as True/False."""
        out = {_SETTING_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        out["memory_budget"] = max(1, int(self.memory_gb * 2**30))
        if self.spill is not None:
            out["spill"] = {"on": True, "off": False}.get(self.spill, self.spill)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Attribution setting name -> the command-line option that sets it (`--arnoldi-rank` for `rank`)."""
        return {_SETTING_NAMES.get(f.name, f.name): flag_of(f) for f in fields(cls)}

    def for_methods(self, methods: list[str], training_loss: str = "cross_entropy") -> dict[str, Any]:
        """The settings `methods` are built with (`make_method`): `as_dict`, scoring the model's
        `training_loss` unless `loss` is given. Each method is built with them once (no context), so a
        bad setting, or one that no method asked for takes, fails here; the message names the options."""
        settings = {"loss": training_loss, **self.as_dict()}
        try:
            for m in methods:
                make_method(m, settings, {}, progress=False, seed=0, methods=methods)
        except ConfigError as exc:
            message, flags = str(exc), self.flags()
            for name in sorted(settings, key=len, reverse=True):
                flag = flags.get(name, "--" + name.replace("_", "-"))
                message = re.sub(rf"'{name}'|(?<![\w-]){name}(?![\w-])", flag, message)
            if self.loss is None and training_loss != "cross_entropy" and "--score-loss" in message:
                message += f" (the model trains with --loss {training_loss}, which the methods score by default)"
            raise ConfigError(message) from None
        return settings


def method_context(method: str, result, train_cfg: TrainConfig, model_cfg: ModelConfig,
                   data: Dataset) -> dict[str, Any]:
    """Settings `method` takes from the run that trained the model, by what its class declares it
    needs (`method_class(method).needs`, see `modelsense.attribution.NEEDS`): the `modelsense.training.Fit`
    `result` (TracIn's checkpoints and learning rates; the optimizer of mpe after IVON/Adam), the
    training recipe with a builder of fresh models (ensembles), δ (prior precision, weight decay)."""
    needs = method_class(method).needs
    ctx: dict[str, Any] = {}
    if "checkpoints" in needs:
        ckpts, lrs = checkpoints_from_fit(result)
        ctx.update(checkpoints=ckpts, learning_rates=lrs)
    if "recipe" in needs:
        ctx.update(train_config=replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=()),
                   model_fn=lambda s: build_model_from_config(model_cfg, data.input_shape, data.num_classes,
                                                              seed=int(s)))
    if "prior_precision" in needs:
        ctx["prior_precision"] = max(train_cfg.delta, 1e-8)
    if "delta" in needs:
        ctx["delta"] = train_cfg.delta
    if "optimizer_state" in needs and train_cfg.optimizer in ("ivon", "adam"):
        ctx.update(source=train_cfg.optimizer, optimizer=result.optimizer)
    return ctx


def make_method(method: str, settings: dict[str, Any], context: dict[str, Any], progress: bool, seed: int,
                methods: list[str] | None = None):
    """The unfitted attributor of `method` with the shared `settings` (those it takes; a setting none of
    `methods` takes is refused) and its `context` from training."""
    given = {k: v for k, v in settings.items() if v is not None}
    return make_attributor(method, {"seed": seed, **given, **context, "progress": progress}, strict=False,
                           shared_with=methods or [method])


def method_for_run(method: str, settings: dict[str, Any], result, train_cfg: TrainConfig, model_cfg: ModelConfig,
                   data: Dataset, progress: bool = True, methods: list[str] | None = None):
    """`make_method` with the `method_context` of the run (`result`, `train_cfg`, `model_cfg`, `data`)
    that trained the model, seeded with its training seed: the attributor to fit on that model."""
    ctx = method_context(method, result, train_cfg, model_cfg, data)
    return make_method(method, settings, ctx, progress, train_cfg.seed, methods)


def check_self_influence(methods: list[str]) -> None:
    """Rankings by self-influence need methods whose self-score varies (not grad-cos: cos(g_i, g_i) = 1)."""
    flat = [m for m in methods if not method_class(m).informative_self]
    if flat:
        raise ConfigError(f"{', '.join(flat)} gives the same self-influence to every example (cos(g_i, g_i) = 1), "
                          "so it cannot rank training examples; use grad-dot or another method")


def check_pairwise(methods: list[str], needed_by: str, fix: str) -> None:
    """ConfigError when any of `methods` gives a self-influence only (no train-test scores), which
    `needed_by` needs; the message ends with how to `fix` it (`{it}`: the method, or them)."""
    single = [m for m in methods if not method_class(m).pairwise]
    if single:
        raise ConfigError(f"{needed_by} needs train-test influence; {', '.join(single)} "
                          f"{'gives' if len(single) == 1 else 'give'} a self-influence only: "
                          + fix.format(it="it" if len(single) == 1 else "them"))


__all__ = ["MethodSettings", "check_pairwise", "check_self_influence", "make_method", "method_context",
           "method_for_run"]
