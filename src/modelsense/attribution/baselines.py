"""Self-influence-only baselines of the GEX paper: `loss`, `el2n`, `fscore`, `cl`, `knn`, `random`.

With p_i the class probabilities of example i (softmax of the logits; sigmoid for `loss="sigmoid_bce"`,
as the GEX code's `multitask`) and e_i = onehot(y_i):

    loss    self_score(i) = l_i(θ*)                        (the trained model's training loss)
    el2n    self_score(i) = (1/R) Σ_r Σ_c (p_ic(θ_r) − e_ic)²     (`el2n_score="brier"`, default: the GEX
                            code's summed Brier score) or (1/R) Σ_r ||p_i(θ_r) − e_i||₂ (`"l2"`: EL2N
                            of Paul et al. 2021), over R models trained from scratch for a few epochs
    fscore  self_score(i) = #{epochs e : i correct after epoch e−1, wrong after epoch e}
                            (forgetting events, Toneva et al. 2019) of a run of the training recipe
    cl      self_score(i) = 1 − p̂_{i,y_i} (`cl_score="self_confidence"`, default: the GEX code's
                            cleanlab call) or max_{c≠y_i} (p̂_ic − t_c) − (p̂_{i,y_i} − t_{y_i})
                            (`"margin"`: the margin of Northcutt et al.'s per-class thresholds
                            t_c = mean of p̂_ic over the examples labelled c; > 0 roughly where confident
                            learning flags a label issue), with p̂ out-of-fold probabilities: k models of
                            the recipe, model f trained without fold f, predicting fold f
    knn     self_score(i) = ||(1/k) Σ_{j ∈ kNN(i)} e_j − e_i||²  (label disagreement of the k nearest
                            other training examples, Euclidean distance of the trained model's
                            penultimate features, or of its logits as the GEX code)
    random  self_score(i) ~ U(0, 1) i.i.d. from the method's seed (the chance baseline)

All rank examples like a self-influence (large = atypical or mislabeled) and have no pairwise scores.
Where a method trains models (el2n, fscore, cl) it uses the training recipe (`needs = {"recipe"}`:
`train_config`, `model_fn`), including the recipe's training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelsense.attribution.base import (
    Attributor,
    ComputeOptions,
    check_choice,
    check_int,
    param_dtype,
    register,
)
from modelsense.core.functional import chunks
from modelsense.errors import ConfigError

EL2N_SCORES = ("brier", "l2")
CL_SCORES = ("self_confidence", "margin")
KNN_SPACES = ("features", "logits")


@register("loss")
class TrainingLoss(Attributor):
    """self_score(i) = l_i(θ*), the per-example training loss of the fitted model."""

    def streams(self) -> bool:
        """Reads the training data in batches by position (a Dataset is never read whole)."""
        return True


    pairwise = False

    def __init__(self, *, loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)

    def _self_scores(self) -> Tensor:
        return self._per_example_losses(self.params_, self.x_train_, self.y_train_).detach().cpu()


class _RecipeModels(Attributor):
    """A method that trains models with the training recipe: `train_config` (`TrainConfig`, default
    TrainConfig()) and `model_fn` (seed -> fresh module; default: the fitted module re-initialised)."""

    pairwise = False
    needs = frozenset({"recipe"})

    def _recipe(self) -> tuple[object, Callable[[int], nn.Module]]:
        from modelsense.attribution.members import reinitialised_copy
        from modelsense.training import TrainConfig

        if self.model_.likelihood != "categorical":
            raise ConfigError(f"{self.name} needs a classification model (likelihood 'categorical')")
        cfg = replace(self.train_config or TrainConfig(), checkpoint_epochs=(), checkpoint_iterations=())
        module = self.model_.module
        return cfg, self.model_fn or (lambda s: reinitialised_copy(module, s))

    def _probabilities(self, logits: Tensor) -> Tensor:
        """The class probabilities of the scoring loss (`Likelihood.mean`: softmax, or sigmoid for sigmoid_bce)."""
        return self.model_.objective.mean(logits.double())


@register("el2n")
class El2n(_RecipeModels):
    """EL2N: over `el2n_repeat` early-trained models, the mean summed Brier score (default) or L2 error.

    Settings: el2n_repeat R (the original's 5), el2n_epochs (epochs of each model; None: 10% of
    train_config.epochs, at least 1; the original's `--el2n_epoch` 10 of 200), el2n_score: `brier`
    (Σ_c (p_c − e_c)², the GEX code's, default, so that `el2n` is the baseline of the GEX paper) or
    `l2` (||p − e||₂, Paul et al.'s EL2N; one model ranks the same under both, a mean over models
    nearly so), train_config, model_fn (the recipe).
    """

    state_attributes = ("el2n_",)

    def __init__(
        self,
        el2n_repeat: int = 5,
        el2n_epochs: int | None = None,
        el2n_score: str = "brier",
        train_config=None,
        model_fn: Callable[[int], nn.Module] | None = None,
        *,
        loss: str = "cross_entropy",
        seed: int = 0,
        compute: ComputeOptions | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.el2n_repeat = check_int("el2n_repeat", el2n_repeat)
        self.el2n_epochs = check_int("el2n_epochs", el2n_epochs, allow_none=True)
        self.el2n_score = check_choice("el2n_score", el2n_score, EL2N_SCORES)
        self.train_config, self.model_fn = train_config, model_fn

    def _fit(self) -> None:
        from modelsense.training import train_ensemble

        base, model_fn = self._recipe()
        cfg = replace(base, epochs=self.el2n_epochs or max(1, round(0.1 * base.epochs)))
        x, y = self.x_train_.cpu().float(), self.y_train_.cpu()
        masks = torch.ones(self.el2n_repeat, len(x), dtype=torch.bool)
        seeds = [base.seed + 5000 + self.seed * 7919 + r for r in range(self.el2n_repeat)]
        res = train_ensemble(
            model_fn, x, y, masks, cfg, seeds=seeds, queries={"train": (x, y)}, progress=self.compute.progress
        )
        logits = res.outputs["train"]["logits"]  # (R, N, C)
        err = self._probabilities(logits) - F.one_hot(y, logits.shape[-1]).double()
        per_model = err.pow(2).sum(-1) if self.el2n_score == "brier" else err.norm(dim=-1)
        self.el2n_ = per_model.mean(0).to(param_dtype(self.params_))

    def _self_scores(self) -> Tensor:
        return self.el2n_.detach().cpu()


@register("fscore")
class ForgettingScore(_RecipeModels):
    """Forgetting events (Toneva et al. 2019; the GEX code's `fscore`) of one run of the training recipe.

    The model is trained again with `train_config` from its seed (`train_config.seed`: with the
    recipe and seed of the fitted model, the very run that made it, up to floating-point rounding;
    the method's own `seed` draws nothing) by `modelsense.training.fit`; after every epoch each
    training example is classified (eval mode), and a forgetting event is counted whenever an example
    classified correctly after the previous epoch is misclassified after this one. The GEX code checks
    correctness at each presentation in a minibatch (train mode, before the step) instead; here the
    check is once per epoch for every example. Examples never learned count 0 events (as the GEX code;
    Toneva et al. rank them first). Counts are integers: many examples tie.
    """

    state_attributes = ("forgetting_",)

    def __init__(self, train_config=None, model_fn: Callable[[int], nn.Module] | None = None, *,
                 loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.train_config, self.model_fn = train_config, model_fn

    def _fit(self) -> None:
        from modelsense.data.dataset import Dataset
        from modelsense.training import fit

        base, model_fn = self._recipe()
        cfg = replace(base, eval_every=1)
        x, y = self.x_train_.cpu().float(), self.y_train_.cpu()
        n_classes = int(self.model_(self.params_, self.x_train_[:1]).shape[-1])
        data = Dataset("fscore", x, y, x[:0], y[:0], n_classes)
        module = model_fn(cfg.seed)
        device = torch.device(cfg.device)
        x_dev, y_dev = x.to(device), y.to(device)
        state = {"correct": torch.zeros(len(x), dtype=torch.bool), "events": torch.zeros(len(x), dtype=torch.long)}

        def count(epoch: int, row: dict) -> None:
            was_training = module.training
            module.eval()
            with torch.no_grad():
                correct = torch.cat([(module(x_dev[s]).argmax(-1) == y_dev[s]).cpu() for s in chunks(len(x), 4096)])
            module.train(was_training)
            state["events"] += (state["correct"] & ~correct).long()
            state["correct"] = correct

        fit(module, data, cfg, progress=self.compute.progress, on_epoch=count)
        self.forgetting_ = state["events"].to(param_dtype(self.params_))

    def _self_scores(self) -> Tensor:
        return self.forgetting_.detach().cpu()


@register("cl")
class ConfidentLearning(_RecipeModels):
    """Confident learning (Northcutt et al. 2021; the GEX code's `cl`) on out-of-fold probabilities.

    The training set is split at random (from `seed`) into `cl_folds` folds (`folds_`, the fold of
    each example; sizes differ by at most one); model f of the recipe
    (trained at once by the retraining engine) learns every fold but f and predicts fold f, so p̂_i
    comes from a model that never saw example i. Settings: cl_folds k (the GEX code's 2 halves),
    cl_score (`self_confidence`, default, the GEX code's; or `margin` with the per-class thresholds),
    train_config, model_fn (the recipe).
    """

    state_attributes = ("oof_probabilities_", "folds_")

    def __init__(self, cl_folds: int = 2, cl_score: str = "self_confidence", train_config=None,
                 model_fn: Callable[[int], nn.Module] | None = None, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.cl_folds = check_int("cl_folds", cl_folds, minimum=2)
        self.cl_score = check_choice("cl_score", cl_score, CL_SCORES)
        self.train_config, self.model_fn = train_config, model_fn

    def _fit(self) -> None:
        from modelsense.training import train_ensemble

        base, model_fn = self._recipe()
        x, y = self.x_train_.cpu().float(), self.y_train_.cpu()
        n, k = len(x), self.cl_folds
        if n < k:
            raise ConfigError(f"cl: {k} folds need at least {k} training examples, received {n}")
        fold = torch.empty(n, dtype=torch.long)
        fold[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 31))] = torch.arange(n) % k
        masks = fold.unsqueeze(0) != torch.arange(k).unsqueeze(1)  # (k, N): model f trains without fold f
        seeds = [base.seed + 3000 + self.seed * 7919 + f for f in range(k)]
        res = train_ensemble(
            model_fn, x, y, masks, base, seeds=seeds, queries={"train": (x, y)}, progress=self.compute.progress
        )
        logits = res.outputs["train"]["logits"]  # (k, N, C)
        self.folds_ = fold
        self.oof_probabilities_ = self._probabilities(logits[fold, torch.arange(n)]).to(param_dtype(self.params_))

    def _self_scores(self) -> Tensor:
        p, y = self.oof_probabilities_.detach().cpu().double(), self.y_train_.cpu()
        own = p.gather(1, y.unsqueeze(1)).squeeze(1)
        if self.cl_score == "self_confidence":
            return (1 - own).to(self.oof_probabilities_.dtype)
        adjusted = p - class_thresholds(p, y)
        others = adjusted.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
        return (others - adjusted.gather(1, y.unsqueeze(1)).squeeze(1)).to(self.oof_probabilities_.dtype)


def class_thresholds(p: Tensor, y: Tensor) -> Tensor:
    """Northcutt et al.'s per-class thresholds t_c = mean of p_ic over the examples labelled c, (C,);
    1 for a class no example is labelled with (no example passes it)."""
    n_classes = p.shape[1]
    counts = torch.bincount(y, minlength=n_classes).to(p.dtype)
    sums = torch.zeros(n_classes, dtype=p.dtype).index_add_(0, y, p.gather(1, y.unsqueeze(1)).squeeze(1))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.ones_like(sums))


@register("knn")
class NearestNeighbourDisagreement(Attributor):
    """Label disagreement of the k nearest neighbours (the GEX code's `knn`).

    Settings: knn_k (None: N // C, the GEX code's), knn_space: `features` (default: the input of the
    model's last nn.Linear, its penultimate representation) or `logits` (the GEX code's, which also
    averages over 5 checkpoints of training; here the trained model alone). Neighbours are the k
    other training examples nearest in Euclidean distance (the GEX code counts the example itself
    among them, which moves a score by O(1/k)).
    """

    pairwise = False
    state_attributes = ("knn_",)

    def __init__(self, knn_k: int | None = None, knn_space: str = "features", *, loss: str = "cross_entropy",
                 seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.knn_k = check_int("knn_k", knn_k, allow_none=True)
        self.knn_space = check_choice("knn_space", knn_space, KNN_SPACES)

    def _embed(self, x: Tensor) -> Tensor:
        """Penultimate features or logits of `x` under the fitted parameters, (n, d)."""
        if self.knn_space == "logits":
            with torch.no_grad():
                return torch.cat([self.model_(self.params_, x[s]) for s in chunks(len(x), 4 * self.chunk_size_)])
        linears = [m for m in self.model_.module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("knn: the model has no nn.Linear layer whose input is its penultimate representation; "
                              "use knn_space='logits'")
        seen: list[Tensor] = []
        hook = linears[-1].register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].detach().flatten(1)))
        try:
            with torch.no_grad():
                for s in chunks(len(x), 4 * self.chunk_size_):
                    self.model_(self.params_, x[s])
        finally:
            hook.remove()
        return torch.cat(seen)

    def _fit(self) -> None:
        if self.model_.likelihood != "categorical":
            raise ConfigError("knn needs a classification model (likelihood 'categorical')")
        n = self.n_train
        z = self._embed(self.x_train_).double()
        n_classes = int(self.model_(self.params_, self.x_train_[:1]).shape[-1])
        k = self.knn_k or max(1, n // n_classes)
        if k > n - 1:
            raise ConfigError(f"knn: knn_k = {k} neighbours, but there are only {n - 1} other training examples")
        e = F.one_hot(self.y_train_, n_classes).double()
        sq = z.pow(2).sum(1)
        out = torch.empty(n, dtype=torch.float64)
        for rows in chunks(n, self.compute.block_size):
            d = sq[rows].unsqueeze(1) - 2 * z[rows] @ z.T + sq.unsqueeze(0)
            d[torch.arange(d.shape[0]), torch.arange(n)[rows]] = float("inf")  # not its own neighbour
            nearest = d.topk(k, dim=1, largest=False).indices
            out[rows] = (e[nearest].mean(1) - e[rows]).pow(2).sum(1).cpu()
        self.knn_ = out.to(param_dtype(self.params_))

    def _self_scores(self) -> Tensor:
        return self.knn_.detach().cpu()


@register("random")
class RandomScores(Attributor):
    """self_score(i) ~ U(0, 1) i.i.d., drawn from `seed`: the ranking of chance (AUC 1/2 in expectation;
    the GEX code draws N(0, 1), the same random ranking)."""

    def streams(self) -> bool:
        """Reads the training data in batches by position (a Dataset is never read whole)."""
        return True


    pairwise = False
    state_attributes = ("random_",)

    def __init__(self, *, loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)

    def _fit(self) -> None:
        gen = torch.Generator().manual_seed(self.seed + 271828)
        self.random_ = torch.rand(self.n_train, generator=gen, dtype=torch.float64).to(param_dtype(self.params_))

    def _self_scores(self) -> Tensor:
        return self.random_.detach().cpu()
