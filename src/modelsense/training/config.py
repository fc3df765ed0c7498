"""Training settings shared by `fit` (one model) and the retraining engine (many models).

Objective (the MPE convention, SEEDS.md section 0.2): for a model trained on n examples,

    L(θ) = mean_{i in batch} l_i(θ) + δ / (2 n) · ||θ||²

with l_i the per-example loss (`loss`: the negative log-likelihood, or the per-class sigmoid loss;
`modelsense.training.objective`) and δ = `delta` the prior precision. IVON optimises
the same objective as a variational one with `ess = n` and `weight_decay = δ / n` (no L2 term in the
loss). The learning rate follows a cosine schedule from `lr` to `lrmin` over `epochs`, stepped once per
epoch (PyTorch's `CosineAnnealingLR(T_max=epochs, eta_min=lrmin)`).

Batch order: each epoch draws a fresh permutation of the model's own training indices from a
generator seeded with `seed` (the same rule in `fit` and in the engine, so both see the same batches);
the last batch of an epoch may be smaller. `fixed_batches=True` reproduces the original MPE code:
batches in data order, never reshuffled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from modelsense.core.device import check_device
from modelsense.errors import ConfigError
from modelsense.options import joined, ints, option
from modelsense.training.objective import check_loss

OPTIMIZERS = ("sgd", "adam", "ivon")
#: other names of an optimizer: the MPE code calls IVON `iblr`
OPTIMIZER_ALIASES = {"iblr": "ivon"}


@dataclass
class TrainConfig:
    """Settings of one training run (flag names follow the MPE code: --lr --lrmin --bs ...)."""

    optimizer: str = option("sgd", "sgd (momentum 0.9), adam or ivon (iblr, the MPE code's name, is ivon)")
    lr: float = option(0.05, "initial learning rate")
    lrmin: float = option(0.0, "final learning rate of the cosine schedule")
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

    def __post_init__(self) -> None:
        self.optimizer = OPTIMIZER_ALIASES.get(self.optimizer.lower(), self.optimizer.lower())
        if self.optimizer == "adamw":
            raise ConfigError("--optimizer adamw is not offered: the AdamW of the MPE code (Nickl et al. 2023) added "
                              "weight decay 0.01 on top of the L2 term; use --optimizer adam (L2 = δ/(2N)·||θ||² in "
                              "the loss)")
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

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate in epoch `epoch` (0-based): lrmin + (lr - lrmin)(1 + cos(π epoch / epochs)) / 2."""
    return cfg.lrmin + (cfg.lr - cfg.lrmin) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


def batch_generator(seed: int) -> torch.Generator:
    """The generator that orders the minibatches of a model trained with `seed`."""
    return torch.Generator().manual_seed(int(seed) + 7919)


def epoch_batches(indices: Tensor, bs: int, generator: torch.Generator, fixed: bool = False) -> list[Tensor]:
    """Minibatches of one epoch over `indices` (1-D, sorted): a fresh permutation unless `fixed`."""
    order = indices if fixed else indices[torch.randperm(len(indices), generator=generator)]
    return list(order.split(bs))
