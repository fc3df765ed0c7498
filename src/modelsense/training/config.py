"""Training settings shared by `fit` (one model) and the retraining engine (many models).

Objective (the MPE convention, SEEDS.md section 0.2): for a model trained on n examples,

    L(θ) = mean_{i in batch} l_i(θ) + δ / (2 n) · ||θ||²

with l_i the per-example loss (`loss`: the negative log-likelihood, or the per-class sigmoid loss;
`modelsense.training.objective`) and δ = `delta` the prior precision. IVON optimises
the same objective as a variational one with `ess = n` and `weight_decay = δ / n` (no L2 term in the
loss). AdamW (`adamw`, Loshchilov & Hutter) has no L2 term in the loss either: its weight decay
δ / n is decoupled, θ ← (1 − η_t δ / n) θ before each Adam step (PyTorch's `AdamW(weight_decay=δ/n)`,
as the first script of the MPE code, `1_loo_iterations.py`).

Learning-rate schedules (`learning_rate`, the one function `fit` and the engine both call; η_0 = `lr`,
η_min = `lrmin`, E = `epochs`, e the 0-based epoch, k the 0-based step of the run, K = E · steps per
epoch):

    cosine          η_min + (η_0 − η_min)(1 + cos(π e / E)) / 2, per epoch (the default; PyTorch's
                    `CosineAnnealingLR(T_max=E, eta_min=lrmin)` stepped once per epoch, as the MPE code)
    warmup_cosine   per step, W = floor(`warmup_ratio` · K):  η_0 k / W for k < W, then
                    η_min + (η_0 − η_min)(1 + cos(π (k − W) / (K − W))) / 2  (optax's
                    `warmup_cosine_decay_schedule(0, lr, W, K, lrmin)`, the GEX pretraining recipe)
    step            η_0 · γ^{#{m in milestones : m <= e}}, per epoch (PyTorch's `MultiStepLR`; StepLR(s)
                    is milestones s, 2s, 3s, ...: the modelsym zoo's StepLR(12, 0.5) over 50 epochs is
                    --milestones 12,24,36,48 --gamma 0.5); no milestones: constant η_0
    swag            per epoch, t = e / E: η_0 for t <= 0.5, then linear to η_min at t = 0.9, then η_min
                    (`swag.utils.schedule` of Maddox et al. with budget E and swa_lr = lrmin; the
                    effective-dimensionality code's swa=False is lrmin = lr / 100)

Images can be augmented per minibatch (`crop_padding`, `hflip`: see
`modelsense.data.augment`) and mixed (`mixup_alpha`, `fit` only); the random draws come from their own
generator seeded with `seed` (`augment_generator`), so batch orders do not change with them.

Batch order: each epoch draws a fresh permutation of the model's own training indices from a
generator seeded with `seed` (the same rule in `fit` and in the engine, so both see the same batches);
the last batch of an epoch may be smaller. `fixed_batches=True` reproduces the original MPE code:
batches in data order, never reshuffled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from modelsense.core.device import check_device
from modelsense.errors import ConfigError
from modelsense.options import ints, joined, option
from modelsense.training.objective import check_loss

OPTIMIZERS = ("sgd", "adam", "adamw", "ivon")
SCHEDULES = ("cosine", "warmup_cosine", "step", "swag")
#: other names of an optimizer: the MPE code calls IVON `iblr`
OPTIMIZER_ALIASES = {"iblr": "ivon"}


@dataclass
class TrainConfig:
    """Settings of one training run (flag names follow the MPE code: --lr --lrmin --bs ...)."""

    optimizer: str = option("sgd", "sgd (momentum 0.9), adam, adamw (decoupled weight decay δ/N instead of the L2 "
                                   "term) or ivon (iblr, the MPE code's name, is ivon)")
    lr: float = option(0.05, "initial (peak) learning rate")
    lrmin: float = option(0.0, "final learning rate of the cosine, warmup_cosine and swag schedules (swag: swa_lr)")
    epochs: int = option(30, "training epochs")
    bs: int = option(64, "minibatch size")
    delta: float = option(1.0, "prior precision δ: loss = mean NLL + δ/(2N)·||θ||²")
    loss: str = option("cross_entropy", "training loss: cross_entropy (softmax NLL) or sigmoid_bce (one sigmoid per "
                                        "class, summed: the GEX code of Kim et al. 2023)")
    hess_init: float = option(0.1, "IVON's initial Hessian estimate h0")
    momentum: float = 0.9
    beta2: float = 0.999
    seed: int = option(0, "init and batch-order seed")
    device: str = option("cpu", "cpu or cuda (cuda:K for GPU K)")
    fixed_batches: bool = option(False, "never reshuffle minibatches (as the MPE code of Nickl et al. 2023)",
                                 flag="--fixed-batches")
    mc_samples: int = 1
    checkpoint_epochs: tuple[int, ...] = option((), "comma-separated epochs at which to save parameters",
                                                parse=ints, show=joined)
    checkpoint_iterations: tuple[int, ...] = option((), "comma-separated iterations (optimizer steps) at which to "
                                                    "save parameters", parse=ints, show=joined)
    eval_every: int = 1
    extra: dict = field(default_factory=dict)
    schedule: str = option("cosine", "learning-rate schedule: cosine (lr to lrmin, per epoch), warmup_cosine (linear "
                                     "warm-up, then cosine to lrmin, per step: GEX), step (lr·gamma at each of "
                                     "--milestones: StepLR) or swag (constant, then linear to lrmin: SWAG)")
    warmup_ratio: float = option(0.1, "warmup_cosine: fraction of all steps spent warming up from 0 (GEX's "
                                      "--warmup_ratio)")
    milestones: tuple[int, ...] = option((), "step schedule: comma-separated epochs after which the learning rate "
                                         "is multiplied by --gamma", parse=ints, show=joined)
    gamma: float = option(0.1, "step schedule: factor at each milestone")
    crop_padding: int = option(0, "random crop of image minibatches: pad by this many zero pixels per side and crop "
                                  "back at a random offset, per example (4 on CIFAR: He et al., GEX, Maddox et al.); "
                                  "0: off")
    hflip: bool = option(False, "random horizontal flip of image minibatches, per example with probability 1/2",
                         flag="--hflip/--no-hflip")
    mixup_alpha: float = option(0.0, "mixup (Zhang et al. 2018; GEX's --mixup_alpha): train on λx_i + (1-λ)x_j with "
                                     "loss λl(y_i) + (1-λ)l(y_j), λ ~ Beta(α, α) per batch; 0: off; not in the "
                                     "retraining engine")

    def __post_init__(self) -> None:
        self.optimizer = OPTIMIZER_ALIASES.get(self.optimizer.lower(), self.optimizer.lower())
        self.checkpoint_epochs = tuple(int(e) for e in self.checkpoint_epochs)
        check_loss(self.loss)
        self.checkpoint_iterations = tuple(int(i) for i in self.checkpoint_iterations)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        # written so that NaN fails every check (comparisons with NaN are False)
        if not (0 < self.lr < math.inf):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.lrmin <= self.lr):
            raise ConfigError(f"lrmin must lie in [0, lr={self.lr}], got {self.lrmin}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.bs < 1:
            raise ConfigError(f"bs (batch size) must be >= 1, got {self.bs}")
        if not (0 <= self.delta < math.inf):
            raise ConfigError(f"delta (prior precision) must be finite and >= 0, got {self.delta}")
        if self.optimizer == "ivon" and not (0 < self.hess_init < math.inf):
            raise ConfigError(f"hess_init must be finite and > 0 for IVON, got {self.hess_init}")
        self.device = check_device(self.device)
        self.checkpoint_epochs = tuple(sorted(int(e) for e in self.checkpoint_epochs))
        self.checkpoint_iterations = tuple(sorted(int(i) for i in self.checkpoint_iterations))
        bad = [e for e in self.checkpoint_epochs if not 0 <= e <= self.epochs]
        if bad:
            raise ConfigError(f"checkpoint epochs {bad} outside [0, epochs={self.epochs}]")
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.milestones and self.schedule != "step":
            raise ConfigError(f"--milestones are for --schedule step, but the schedule is {self.schedule!r}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(f"milestones must be increasing epochs >= 1, got {list(self.milestones)}")
        if not (0 < self.gamma < math.inf):
            raise ConfigError(f"gamma must be finite and > 0, got {self.gamma}")
        if not (0 <= self.warmup_ratio < 1):
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if isinstance(self.crop_padding, bool) or int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be an int >= 0 (pixels), got {self.crop_padding!r}")
        self.crop_padding = int(self.crop_padding)
        if not (0 <= self.mixup_alpha < math.inf):
            raise ConfigError(f"mixup_alpha must be finite and >= 0 (0: no mixup), got {self.mixup_alpha}")
        if self.schedule == "step" and self.lrmin != 0:
            raise ConfigError(f"the step schedule has no final learning rate (it ends at lr·gamma^k); drop --lrmin "
                              f"({self.lrmin})")

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate in epoch `epoch` (0-based): lrmin + (lr - lrmin)(1 + cos(π epoch / epochs)) / 2."""
    return cfg.lrmin + (cfg.lr - cfg.lrmin) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


def learning_rate(cfg: TrainConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate of step `step` (0-based, within the epoch) of epoch `epoch` (0-based) of a run
    with `steps_per_epoch` optimizer steps per epoch, under `cfg.schedule` (formulas in the module
    docstring). Only warmup_cosine changes within an epoch; the others ignore `step`."""
    if cfg.schedule == "cosine":
        return cosine_lr(cfg, epoch)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    if cfg.schedule == "swag":
        t = epoch / cfg.epochs
        ratio = cfg.lrmin / cfg.lr
        factor = 1.0 if t <= 0.5 else (1.0 - (1.0 - ratio) * (t - 0.5) / 0.4 if t <= 0.9 else ratio)
        return cfg.lr * factor
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_ratio * total)
    k = epoch * steps_per_epoch + step
    if k < warmup:
        return cfg.lr * k / warmup
    return (
        cfg.lrmin
        + (cfg.lr - cfg.lrmin) * (1 + math.cos(math.pi * min(k - warmup, total - warmup) / (total - warmup))) / 2
    )


def steps_per_epoch(n: int, bs: int) -> int:
    """Optimizer steps in one epoch over n examples in batches of bs: ceil(n / bs) (`epoch_batches`)."""
    return -(-int(n) // int(bs))


def augment_generator(seed: int) -> torch.Generator:
    """The generator of the random crops and flips of a model trained with `seed`."""
    return torch.Generator().manual_seed(int(seed) + 104729)


def mixup_rng(seed: int) -> np.random.Generator:
    """The generator of the mixup draws (λ and pairing per batch) of a model trained with `seed`."""
    return np.random.default_rng(int(seed) + 104729)


def batch_generator(seed: int) -> torch.Generator:
    """The generator that orders the minibatches of a model trained with `seed`."""
    return torch.Generator().manual_seed(int(seed) + 7919)


def epoch_order(indices: Tensor, generator: torch.Generator, fixed: bool = False) -> Tensor:
    """The order of `indices` (1-D, sorted) in one epoch: a fresh permutation unless `fixed`."""
    return indices if fixed else indices[torch.randperm(len(indices), generator=generator)]


def epoch_batches(indices: Tensor, bs: int, generator: torch.Generator, fixed: bool = False) -> list[Tensor]:
    """Minibatches of one epoch over `indices` (1-D, sorted): `epoch_order` cut into batches of bs."""
    return list(epoch_order(indices, generator, fixed).split(bs))
