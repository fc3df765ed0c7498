"""Train one model: SGD (momentum), Adam, AdamW or IVON, a learning-rate schedule, checkpoints, history."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modelsense.core.functional import chunks
from modelsense.core.likelihood import likelihood_for
from modelsense.data.augment import check_images, crop_flip, draw_crop_flip, draw_mixup
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.progress import progress_bar
from modelsense.training.config import (
    TrainConfig,
    augment_generator,
    batch_generator,
    epoch_batches,
    learning_rate,
    mixup_rng,
    steps_per_epoch,
)


@dataclass
class Fit:
    """The result of `fit`.

    Attributes:
        module: the trained network (eval mode), holding the final (mean) parameters.
        params: detached copies of the final parameters, name -> tensor.
        optimizer: the optimizer with its state (IVON's Hessian estimate, Adam's moments), which the
            posteriors of the curvature layer read.
        history: per evaluated epoch: `epoch`, `lr`, `train_loss`, `train_accuracy`, `test_loss`,
            `test_accuracy`, `seconds` (loss = mean training loss `cfg.loss` at the mean parameters, no
            prior term: the NLL of the model's likelihood).
        checkpoints: parameter snapshots keyed `epoch_E` / `iteration_T`.
        n_train: number of training examples the objective was built on.
    """

    module: nn.Module
    params: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    n_train: int
    history: dict[str, list[float]] = field(default_factory=dict)
    checkpoints: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.history.items() if v}

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last evaluation as commands report it: `train_accuracy`, `test_accuracy`, `train_nll`, `test_nll`."""
        f = self.final
        return {"train_accuracy": f["train_accuracy"], "test_accuracy": f["test_accuracy"],
                "train_nll": f["train_loss"], "test_nll": f["test_loss"]}


@torch.no_grad()
def evaluate(module: nn.Module, x: Tensor, y: Tensor, likelihood: str = "categorical", chunk_size: int = 2048,
             loss: str = "cross_entropy", rows: Tensor | None = None) -> dict[str, float]:
    """Mean loss (`loss`, see `objective`) and accuracy (classification) of `module` in eval mode on (x, y),
    or on its rows `rows` (gathered `chunk_size` at a time: no copy of the whole subset)."""
    nll = likelihood_for(likelihood, loss).nll
    was_training = module.training
    module.eval()
    total, correct = 0.0, 0
    count = len(x) if rows is None else len(rows)
    for s in chunks(count, chunk_size):
        xs, ys = (x[s], y[s]) if rows is None else (x[rows[s]], y[rows[s]])
        out = module(xs)
        total += float(nll(out, ys).sum())
        if likelihood == "categorical":
            correct += int((out.argmax(-1) == ys).sum())
    module.train(was_training)
    n = max(count, 1)
    res = {"loss": total / n}
    if likelihood == "categorical":
        res["accuracy"] = correct / n
    return res


def make_optimizer(module: nn.Module, cfg: TrainConfig, n: int) -> torch.optim.Optimizer:
    """The optimizer for `cfg`; IVON gets ess = n and weight_decay = δ / n, AdamW the decoupled weight
    decay δ / n (MPE's convention)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.delta / n)
    import ivon

    return ivon.IVON(
        params,
        lr=cfg.lr,
        ess=float(n),
        weight_decay=cfg.delta / n,
        hess_init=cfg.hess_init,
        beta1=cfg.momentum,
        beta2=0.99999,
        mc_samples=cfg.mc_samples,
    )


def l2_penalty(params, delta: float, n: int) -> Tensor:
    """δ / (2 n) · ||θ||², the prior term of the objective."""
    return (delta / (2 * n)) * sum(p.pow(2).sum() for p in params)


def fit(
    module: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    train_indices: Tensor | None = None,
    likelihood: str = "categorical",
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> Fit:
    """Train `module` on `data.x_train[train_indices]` (all by default) with the settings `cfg`.

    Minimises the mean minibatch loss (`cfg.loss`: the NLL of `likelihood`, or the per-class sigmoid
    loss) + δ/(2n)·||θ||² (SGD/Adam), with AdamW's decoupled weight decay δ/n, or the equivalent IVON
    objective, under the learning-rate schedule `cfg.schedule`; see `modelsense.training.config` for
    the conventions. Image minibatches are cropped and flipped (`cfg.crop_padding`, `cfg.hflip`; draws
    once per epoch for its order of examples) and mixed (`cfg.mixup_alpha`), see
    `modelsense.data.augment`; evaluation uses the data as they are. The module is
    trained in place and returned in eval mode inside a `Fit`.
    """
    nll = likelihood_for(likelihood, cfg.loss).nll  # ConfigError for a loss that does not fit
    augment = cfg.crop_padding > 0 or cfg.hflip
    if augment:
        check_images(data.x_train, "--crop-padding / --hflip")
    if cfg.mixup_alpha > 0 and likelihood != "categorical":
        raise ConfigError("mixup (--mixup-alpha) needs a classification model (likelihood 'categorical')")
    device = torch.device(cfg.device)
    module.to(device).train()
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    idx = torch.arange(len(x)) if train_indices is None else torch.as_tensor(train_indices).flatten().sort().values
    n = len(idx)
    if n == 0:
        raise ConfigError("cannot train on an empty set of training examples")
    optimizer = make_optimizer(module, cfg, n)
    params = [p for p in module.parameters() if p.requires_grad]
    gen, aug_gen, mix_rng = batch_generator(cfg.seed), augment_generator(cfg.seed), mixup_rng(cfg.seed)
    result = Fit(module, {}, optimizer, cfg, n, history={k: [] for k in
                 ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds")})

    def snapshot(key: str) -> None:
        result.checkpoints[key] = {k: v.detach().clone().cpu() for k, v in module.named_parameters()}

    if 0 in cfg.checkpoint_epochs:
        snapshot("epoch_0")
    iteration, start = 0, time.perf_counter()
    it_marks = set(cfg.checkpoint_iterations)
    steps = steps_per_epoch(n, cfg.bs)

    def batch_loss(xb: Tensor, yb: Tensor, mix: tuple[float, Tensor] | None) -> Tensor:
        """Mean loss of the minibatch; with mix = (λ, pairing) the mixup loss."""
        if mix is not None:
            lam, pair = mix[0], mix[1].to(device)
            out = module(lam * xb + (1 - lam) * xb[pair])
            return (lam * nll(out, yb)
                    + (1 - lam) * nll(out, yb[pair])).mean()
        return nll(module(xb), yb).mean()

    # the draws of torch's global generator (IVON's weight noise, dropout) come from cfg.seed, so a run
    # repeats exactly; the caller's generator state is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        with progress_bar(cfg.epochs, f"train {cfg.optimizer}", enabled=progress) as bar:
            for epoch in range(cfg.epochs):
                lr = learning_rate(cfg, epoch, 0, steps)
                batches = epoch_batches(idx, cfg.bs, gen, cfg.fixed_batches)
                offsets, flips = draw_crop_flip(n, cfg.crop_padding, cfg.hflip, aug_gen) if augment else (None, None)
                start_of = 0
                for step, batch in enumerate(batches):
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(cfg, epoch, step, steps)
                    bi = batch.to(device)
                    xb, yb = x[bi], y[bi]
                    if augment:
                        here = slice(start_of, start_of + len(batch))
                        xb = crop_flip(xb, cfg.crop_padding, None if offsets is None else offsets[here],
                                       None if flips is None else flips[here])
                    start_of += len(batch)
                    mix = draw_mixup(len(xb), cfg.mixup_alpha, mix_rng) if cfg.mixup_alpha > 0 else None
                    if cfg.optimizer == "ivon":
                        for _ in range(cfg.mc_samples):
                            with optimizer.sampled_params(train=True):
                                optimizer.zero_grad()
                                batch_loss(xb, yb, mix).backward()
                    else:
                        optimizer.zero_grad()
                        loss = batch_loss(xb, yb, mix)
                        if cfg.optimizer != "adamw":  # AdamW decays the weights itself (decoupled)
                            loss = loss + l2_penalty(params, cfg.delta, n)
                        loss.backward()
                    optimizer.step()
                    iteration += 1
                    if iteration in it_marks:
                        snapshot(f"iteration_{iteration}")
                if (epoch + 1) in cfg.checkpoint_epochs:
                    snapshot(f"epoch_{epoch + 1}")
                last = epoch + 1 == cfg.epochs
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
                    rows = None if train_indices is None else idx.to(x.device)  # gathered chunk by chunk
                    tr = evaluate(module, x, y, likelihood, loss=cfg.loss, rows=rows)
                    te = evaluate(module, x_test, y_test, likelihood, loss=cfg.loss) if len(x_test) else {}
                    row = {
                        "epoch": epoch + 1,
                        "lr": lr,
                        "train_loss": tr["loss"],
                        "train_accuracy": tr.get("accuracy", float("nan")),
                        "test_loss": te.get("loss", float("nan")),
                        "test_accuracy": te.get("accuracy", float("nan")),
                        "seconds": time.perf_counter() - start,
                    }
                    for k, v in row.items():
                        result.history[k].append(v)
                    bar.advance(1, loss=row["train_loss"], test_acc=row["test_accuracy"])
                    if on_epoch is not None:
                        on_epoch(epoch + 1, row)
                else:
                    bar.advance(1)
    module.eval()
    result.params = {k: v.detach().clone() for k, v in module.named_parameters()}
    return result
