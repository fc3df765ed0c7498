"""The retraining engine: many models trained at once, each on its own examples.

One engine serves every ground truth of the project: exact leave-one-out and leave-one-class-out
retraining, random-subset farms (memorization, influence, consistency, LDS) and seed ensembles.
M models are trained together with stacked parameters: MLPs (`nn.Sequential` of Flatten, Linear and
ReLU / Tanh) by batched matmuls over the model axis with a hand-written backward (`_StackedMLP`),
other models by `torch.func.vmap(grad(...))` over the model axis. Each model m has its own example
mask (or non-negative weights) w_m ∈ R^N, its own init seed, its own batch order. In step t of
epoch e, model m takes one step of functional SGD (momentum, PyTorch's update), Adam (PyTorch's
update, bias-corrected) or AdamW (PyTorch's, decoupled weight decay δ / n_m instead of the prior
term) on

    L_mt(θ) = Σ_{i ∈ B_mt} w_mi l_i(θ) / Σ_{i ∈ B_mt} w_mi  +  δ / (2 n_m) · ||θ||²,
    n_m = Σ_i w_mi,

at the learning rate `learning_rate(cfg, e, t, T_m)` (T_m = ceil(|plan of m| / bs) steps per epoch:
only the warmup_cosine schedule depends on t and T_m), where B_mt is the t-th minibatch of model m's
batch plan. Images are cropped and flipped as in `fit` (`cfg.crop_padding`, `cfg.hflip`: model m
draws once per epoch, from `augment_generator(seed_m)`, for its plan's order of examples, so with the
"own" plan it sees the crops and flips `fit` draws); mixup (`cfg.mixup_alpha`) is refused: it would
mix a model's examples with those it leaves out.
A step whose batch carries no weight (Σ_{i ∈ B_mt} w_mi = 0, or no batch t in this epoch) is
skipped: the model's parameters and optimizer state (momentum, Adam's moments and step count) are
left unchanged. The batch plan (`batch_plan=`) is

    "own" (default): `epoch_batches` over the model's own examples {i : w_mi > 0} (sorted), with the
        generator `batch_generator(seed_m)`: exactly the batches `fit(..., train_indices=...)` sees for
        the same seed, so training model m alone with `fit` gives the same model up to floating-point
        rounding; models with fewer batches in an epoch skip the remaining steps.
    "shared": `epoch_batches` over all N examples with the same generator: every model sees the
        batches of the model trained on all N examples with its seed (models with one seed: one
        batch schedule, common random numbers), and an example with w_mi = 0 stays in its batches
        but adds nothing to the loss, the denominator or n_m. With 0/1 weights, model m is thus
        trained on its subset S_m = {i : w_mi = 1} by minibatch mean loss over B_mt ∩ S_m, with the
        prior δ/(2|S_m|)·||θ||², skipping the steps whose batch holds no example of S_m.

What comes back is per-model *outputs* on requested query sets (logits, losses, correctness,
margins), not parameters (unless asked), so memory stays bounded; models are processed in chunks of
`chunk_models`, and `on_chunk` hands each finished chunk to the caller (to stream it to disk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from modelsense.core.functional import Params, chunks, map_inputs
from modelsense.core.likelihood import likelihood_for
from modelsense.data.augment import check_images, crop_flip, draw_crop_flip
from modelsense.data.stream import Rows, as_examples, is_stream
from modelsense.errors import ConfigError
from modelsense.progress import progress_bar
from modelsense.training.config import (
    TrainConfig,
    augment_generator,
    batch_generator,
    epoch_order,
    learning_rate,
    steps_per_epoch,
)

QueryOutputs = dict[str, Tensor]
#: PyTorch's fused SGD step (what `torch.optim.SGD(fused=True)` calls; CPU and CUDA since torch 2.4), else None
_TORCH_MINOR = tuple(map(int, torch.__version__.split(".")[:2]))
_FUSED_SGD = getattr(torch, "_fused_sgd_", None) if _TORCH_MINOR >= (2, 4) else None
BATCH_PLANS = ("own", "shared")


@dataclass
class EnsembleResult:
    """Outputs of M models.

    Attributes:
        seeds: (M,) the init / batch-order seed of each model.
        outputs: query name -> {"logits": (M, n, C) if kept, "loss": (M, n), "correct": (M, n) bool,
            "margin": (M, n) (logit of the label minus the largest other logit)}.
        params: stacked final parameters name -> (M, *shape), only when `return_params=True`.
    """

    seeds: Tensor
    outputs: dict[str, QueryOutputs] = field(default_factory=dict)
    params: Params | None = None

    @staticmethod
    def concat(parts: Sequence[EnsembleResult]) -> EnsembleResult:
        """Join the results of consecutive chunks of models along the model axis."""
        out = EnsembleResult(torch.cat([p.seeds for p in parts]))
        for q in parts[0].outputs:
            out.outputs[q] = {k: torch.cat([p.outputs[q][k] for p in parts]) for k in parts[0].outputs[q]}
        if parts[0].params is not None:
            out.params = {k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params}
        return out


def _check_module(module: nn.Module) -> None:
    bn = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ConfigError(
            f"the retraining engine cannot train models with batch norm (modules {bn[:3]}): batch "
            "statistics couple the examples of a batch and the running statistics cannot be updated "
            "under vmap; build the model with a per-example normalisation (norm='gn', 'frn' or 'none')"
        )


def _stack(dicts: Sequence[Params]) -> Params:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _epoch_plan(
    indices: Sequence[Tensor], bs: int, gens: Sequence[torch.Generator], fixed: bool
) -> tuple[Tensor, Tensor]:
    """Batch indices (M, T, bs) and validity (M, T, bs) of one epoch for every model."""
    per_model = [epoch_order(idx, g, fixed) if len(idx) else idx for idx, g in zip(indices, gens)]  # uncut batches
    lengths = [len(o) for o in per_model]
    steps = -(-max(lengths) // bs)
    valid = torch.arange(steps * bs) < torch.tensor(lengths).unsqueeze(1)  # m's order fills its first lengths[m] slots
    index = torch.zeros(len(per_model), steps * bs, dtype=torch.long)
    index[valid] = torch.cat(per_model)
    return index.view(len(per_model), steps, bs), valid.view(len(per_model), steps, bs)


def _epoch_augment(lengths: Sequence[int], shape: torch.Size, gens: Sequence[torch.Generator],
                   cfg: TrainConfig) -> tuple[Tensor | None, Tensor | None]:
    """Crop offsets (M, T, bs, 2) and flips (M, T, bs) of one epoch laid out as `_epoch_plan`'s index
    (M, T, bs): model m's draws (`draw_crop_flip` for its plan's `lengths[m]` examples) first."""
    m, t, bs = shape
    offsets = torch.zeros(m, t * bs, 2, dtype=torch.long) if cfg.crop_padding > 0 else None
    flips = torch.zeros(m, t * bs, dtype=torch.bool) if cfg.hflip else None
    for row, (length, g) in enumerate(zip(lengths, gens)):
        off, flip = draw_crop_flip(length, cfg.crop_padding, cfg.hflip, g)
        if offsets is not None:
            offsets[row, :length] = off
        if flips is not None:
            flips[row, :length] = flip
    return (None if offsets is None else offsets.view(m, t, bs, 2)), (None if flips is None else flips.view(m, t, bs))


class _StackedMLP:
    """The gradient of `model_loss` for M stacked MLPs by batched matmuls and a hand-written backward.

    For an `nn.Sequential` of an optional leading `nn.Flatten`, `nn.Linear` layers and ReLU / Tanh /
    Identity activations (the package's MLP), every trained parameter in a Linear layer, each layer is
    one `baddbmm` over the M models forward, and one `bmm` for the weight gradient and one for the
    input gradient backward: z_k = h_{k−1} W_kᵀ + b_k, h_k = a(z_k); with δ_L = w_i / Σ_B w ·
    ∂nll/∂f (the likelihood's `output_grad`), ∇W_k = δ_kᵀ h_{k−1}, ∇b_k = Σ_i δ_k, δ_{k−1} = (δ_k W_k) ⊙ a'(z_{k−1}).
    This is the engine's step without vmap or autograd: the same gradient up to rounding, at the cost of
    the matmuls (on a CPU, digits MLP, 64 models: about 1.3x the step of vmap(grad)).
    """

    ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Identity)

    def __init__(self, layers: list[tuple[str, str | None, type | None]], objective) -> None:
        self.layers, self.objective = layers, objective
        self.softmax_ce = (objective.family, objective.loss) == ("categorical", "cross_entropy")
        self._work: dict[str, Tensor] = {}  # `grads`' outputs and activations, reused from step to step

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The workspace tensor `name` of `shape` (allocated once: every step has the same shapes, and
        fresh tensors of megabytes each step cost page faults and cold caches)."""
        t = self._work.get(name)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            t = self._work[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t

    @classmethod
    def of(cls, module: nn.Module, names: list[str], consts: dict[str, Tensor], objective) -> _StackedMLP | None:
        """The stacked MLP of `module`, or None when it is not such a Sequential (then vmap(grad) is used)."""
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward or consts:
            return None
        layers: list[tuple[str, str | None, type | None]] = []
        covered: set[str] = set()
        for k, (name, child) in enumerate(module.named_children()):
            if type(child) is nn.Flatten and k == 0 and child.start_dim == 1 and child.end_dim == -1:
                continue
            if type(child) is nn.Linear:
                w, b = f"{name}.weight", f"{name}.bias" if child.bias is not None else None
                layers.append((w, b, None))
                covered.update(n for n in (w, b) if n)
            elif type(child) in cls.ACTIVATIONS and layers and layers[-1][2] is None:
                layers[-1] = (*layers[-1][:2], type(child))
            else:
                return None
        if not layers or covered != set(names) or layers[-1][2] not in (None, nn.Identity):
            return None
        return cls(layers, objective)

    #: floats of one layer's outputs that `forward` computes at once (8 MB: a group of models whose
    #: activations stay in cache, about 1.7x faster on a CPU than all M models at once)
    FORWARD_FLOATS = 1 << 21

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Outputs (M, n, C) of the M models on the same examples x (n, ...), a group of models at a time."""
        m, n = next(iter(params.values())).shape[0], len(x)
        x = x.reshape(1, n, -1)
        widest = max(params[w].shape[1] for w, _, _ in self.layers)
        outs = []
        for group in chunks(m, self.FORWARD_FLOATS // max(1, n * widest)):
            p = {k: v[group] for k, v in params.items()}
            h = x.expand(group.stop - group.start, -1, -1)
            for layer in self.layers:
                h = self._layer(p, h, *layer)
            outs.append(h)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def _layer(params: Params, h: Tensor, w: str, b: str | None, act: type | None, out: Tensor | None = None) -> Tensor:
        """One stacked Linear (+ activation) of every model: h (M, n, d_in) -> (M, n, d_out) (into `out`)."""
        h = torch.bmm(h, params[w].transpose(1, 2), out=out) if b is None else torch.baddbmm(
            params[b].unsqueeze(1), h, params[w].transpose(1, 2), out=out)
        if act is nn.ReLU:
            return h.relu_()
        if act is nn.Tanh:
            return h.tanh_()
        return h

    def grads(self, params: Params, xb: Tensor, yb: Tensor, wb: Tensor) -> Params:
        """∇θ of every model's weighted minibatch loss: xb (M, bs, ...), yb (M, bs, ...), wb (M, bs).
        The gradients are workspace tensors that the next call overwrites."""
        m, bs = wb.shape
        h = xb.reshape(m, bs, -1)
        inputs = []
        for k, layer in enumerate(self.layers):
            inputs.append(h)
            h = self._layer(params, h, *layer, out=self._buffer(f"h{k}", (m, bs, params[layer[0]].shape[1]), h))
        total = wb.sum(1, keepdim=True)  # 0 only in skipped steps (their gradient is discarded): avoid 0/0
        coef = wb / torch.where(total > 0, total, torch.ones_like(total))
        if self.softmax_ce:  # p − onehot(y); softmax over the class axis laid out first (5x faster for 10 classes)
            delta = torch.softmax(h.transpose(1, 2), 1).transpose(1, 2)
            delta.scatter_add_(2, yb.unsqueeze(-1), torch.full_like(delta[..., :1], -1.0))
        else:
            delta = self.objective.output_grad(h.reshape(m * bs, -1), yb.reshape(m * bs, *yb.shape[2:])).view(m, bs, -1)
        delta = delta.mul_(coef.unsqueeze(-1))
        out: Params = {}
        for k in reversed(range(len(self.layers))):
            w, b, _ = self.layers[k]
            out[w] = torch.bmm(delta.transpose(1, 2), inputs[k], out=self._buffer(f"g.{w}", params[w].shape, delta))
            if b is not None:
                out[b] = torch.sum(delta, 1, out=self._buffer(f"g.{b}", params[b].shape, delta))
            if k:
                dh = torch.bmm(delta, params[w], out=self._buffer(f"d{k}", inputs[k].shape, delta))
                act, h = self.layers[k - 1][2], inputs[k]  # h = a(z) of the layer below
                if act is nn.ReLU:  # a'(z) = [h > 0], in place
                    delta = torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)
                elif act is nn.Tanh:  # a'(z) = 1 − h²
                    delta = dh.mul_(1 - h * h)
                else:
                    delta = dh
        return out


class _FunctionalOptimizer:
    """SGD with momentum, Adam or AdamW on stacked parameters (M, *shape), matching torch.optim's updates.

    The prior term's gradient (δ / n_m) θ is added here rather than differentiated under vmap (it
    costs as much as the data gradient there); AdamW instead multiplies θ by 1 − lr δ / n_m before its
    step. Updates are in place; models whose `active` flag is False in a step keep their parameters and
    optimizer state. `lr` is a number, or one per model (M,).
    """

    def __init__(self, cfg: TrainConfig, params: Params, prior_coef: Tensor) -> None:
        self.cfg = cfg
        self.prior_coef = prior_coef  # (M,) = δ / n_m
        self.buf = {k: torch.zeros_like(v) for k, v in params.items()}
        self.coefs = {k: prior_coef.view(-1, *([1] * (v.dim() - 1))) for k, v in params.items()}
        # SGD's step of all models at once is PyTorch's fused SGD (one pass over the parameters); with one
        # prior coefficient for all models (equal n_m: subsets of one size, leave-one-out) as its weight decay
        self.fused = (_FUSED_SGD is not None and cfg.optimizer == "sgd"
                      and next(iter(params.values())).device.type in ("cpu", "cuda"))
        self.uniform_coef = float(prior_coef[0]) if self.fused and bool((prior_coef == prior_coef[0]).all()) else None
        if cfg.optimizer in ("adam", "adamw"):
            self.sq = {k: torch.zeros_like(v) for k, v in params.items()}
            self.steps = torch.zeros_like(prior_coef)

    @torch.no_grad()
    def step(self, params: Params, grads: Params, lr: float | Tensor, active: Tensor,
             every: bool | None = None) -> None:
        """One update; `every` = bool(active.all()) when the caller knows it (saves a device sync)."""
        cfg = self.cfg
        every = bool(active.all()) if every is None else every
        per_model = isinstance(lr, Tensor)
        if cfg.optimizer == "sgd" and every and not per_model:
            # all parameters at once: g ← g + (δ/n) p, buf ← μ buf + g, p ← p − lr buf (the gradients may
            # be the stacked MLP's workspace: they are read, never kept)
            keys = list(params)
            ps, gs, bufs = [params[k] for k in keys], [grads[k] for k in keys], [self.buf[k] for k in keys]
            if self.fused:  # buf = 0 before the first step: μ·0 + g = g, as PyTorch's first step
                decay = self.uniform_coef
                if decay is None:
                    torch._foreach_addcmul_(gs, ps, [self.coefs[k] for k in keys])
                    decay = 0.0
                _FUSED_SGD(ps, gs, bufs, weight_decay=decay, momentum=cfg.momentum, lr=lr, dampening=0.0,
                           nesterov=False, maximize=False, is_first_step=False)
                return
            torch._foreach_mul_(bufs, cfg.momentum)
            torch._foreach_add_(bufs, gs)
            torch._foreach_addcmul_(bufs, ps, [self.coefs[k] for k in keys])
            torch._foreach_add_(ps, bufs, alpha=-lr)
            return
        if cfg.optimizer in ("adam", "adamw"):
            self.steps += active.to(self.steps.dtype)
            t = self.steps.clamp(min=1)
            step_size = lr / (1 - cfg.momentum**t)
            bc2_sqrt = (1 - cfg.beta2**t).sqrt()
        for k, p in params.items():
            shape = (-1, *([1] * (p.dim() - 1)))
            coef = self.prior_coef.view(shape)
            g = grads[k]
            rate = lr.view(shape) if per_model else lr
            if cfg.optimizer == "sgd":
                buf = self.buf[k]
                if every:  # buf = μ buf + g + (δ/n) p ; p -= lr buf, in place
                    buf.mul_(cfg.momentum).add_(g).addcmul_(p, coef)
                    if per_model:
                        p.sub_(buf * rate)
                    else:
                        p.add_(buf, alpha=-lr)
                else:
                    on = active.view(shape)
                    buf.copy_(torch.where(on, buf * cfg.momentum + g + coef * p, buf))
                    p.sub_(rate * buf * on)
            else:
                if cfg.optimizer == "adamw":  # decoupled: p *= 1 - lr δ/n (skipped models keep p)
                    decay = 1 - rate * coef
                    p.mul_(decay if every else torch.where(active.view(shape), decay, torch.ones_like(decay)))
                else:
                    g.addcmul_(p, coef)
                m, v = self.buf[k], self.sq[k]
                if every:
                    m.lerp_(g, 1 - cfg.momentum)
                    v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
                else:
                    on = active.view(shape)
                    m.copy_(torch.where(on, m.lerp(g, 1 - cfg.momentum), m))
                    v.copy_(torch.where(on, v * cfg.beta2 + (1 - cfg.beta2) * g * g, v))
                denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(1e-8)
                update = (m / denom).mul_(step_size.view(shape))
                p.sub_(update if every else update * active.view(shape))


def _step_lr(cfg: TrainConfig, epoch: int, t: int, plan_steps: list[int], device: torch.device) -> float | Tensor:
    """The learning rate of step t of `epoch`: one number, or one per model (M,) where the schedule
    changes within an epoch and the models' plans have different numbers of steps."""
    if cfg.schedule != "warmup_cosine" or len(set(plan_steps)) == 1:
        return learning_rate(cfg, epoch, t, plan_steps[0])
    rate = {s: learning_rate(cfg, epoch, t, s) for s in set(plan_steps)}
    return torch.tensor([rate[s] for s in plan_steps], dtype=torch.float64, device=device)


def query_outputs(
    module: nn.Module,
    params: Params,
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    likelihood: str = "categorical",
    chunk_size: int = 1024,
    keep_logits: bool = True,
    loss: str = "cross_entropy",
    forward: Callable[[Params, Tensor], Tensor] | None = None,
) -> QueryOutputs:
    """Outputs of stacked models (params name -> (M, *shape)) on (x, y), in chunks of examples; "loss"
    is the training loss `loss` (`likelihood_for(likelihood, loss).nll`). `forward(params, x)` -> (M, n, C):
    the models' outputs on a chunk (default: vmap of the module over the model axis)."""

    def one(p: Params, xb: Tensor) -> Tensor:
        return functional_call(module, {**buffers, **p}, (xb,))

    batched = forward or vmap(one, in_dims=(0, None))
    logits, labels = [], []
    with torch.no_grad():
        for s in chunks(len(x), chunk_size):
            logits.append(batched(params, x[s]))
            labels.append(y[s])  # lazy `Rows`: the labels of the batch just gathered
    f = torch.cat(logits, dim=1) if logits else torch.zeros(next(iter(params.values())).shape[0], 0, 0)
    y = torch.cat(labels) if isinstance(y, Rows) else y
    m, n = f.shape[:2]
    out: QueryOutputs = {}
    yy = y.expand(m, *y.shape)
    out["loss"] = likelihood_for(likelihood, loss).nll(f.reshape(m * n, -1), yy.reshape(m * n, *y.shape[1:])).view(m, n)
    if likelihood == "categorical":
        out["correct"] = f.argmax(-1) == y
        true = f.gather(-1, yy.unsqueeze(-1)).squeeze(-1)
        others = f.scatter(-1, yy.unsqueeze(-1), float("-inf")).amax(-1)
        out["margin"] = true - others
    if keep_logits:
        out["logits"] = f
    return out


def train_ensemble(
    model_fn: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    cfg: TrainConfig,
    *,
    seeds: Sequence[int] | Tensor | None = None,
    queries: dict[str, tuple[Tensor, Tensor]] | None = None,
    init_params: Params | None = None,
    chunk_models: int | None = None,
    keep_logits: bool = True,
    return_params: bool = False,
    likelihood: str = "categorical",
    progress: bool = True,
    on_chunk: Callable[[slice, EnsembleResult], None] | None = None,
    batch_plan: str = "own",
    labels: Tensor | None = None,
) -> EnsembleResult:
    """Train M = len(masks) models at once and return their outputs on `queries`.

    Args:
        model_fn: seed -> freshly initialised module (e.g. `lambda s: build_model(..., seed=s)`).
        x, y: training inputs (N, ...) and labels (N,); or x a map-style Dataset / DataLoader (shuffle=False)
            of (x_i, y_i) items with y None (`modelsense.data.stream`): each step gathers its
            batches by index, so the set is never held whole. Queries take the same forms.
        labels: (M, N) class labels, one row per model, that model m trains on instead of y
            (relabeled training sets); the queries keep their own labels (default: y for every model).
        masks: (M, N) bool (model m trains on examples with True) or non-negative float weights w_m
            (the objective in the module docstring: a weighted minibatch mean, prior δ/(2 Σ_i w_mi)).
        cfg: optimizer (`sgd` or `adam`), lr schedule, bs, epochs, delta, fixed_batches, device.
        seeds: (M,) init and batch-order seed per model; default cfg.seed + arange(M).
        queries: name -> (x, y) evaluated after training (default: {"train": (x, y)}).
        init_params: warm start: name -> tensor of the parameter's shape (shared by all models) or
            (M, *shape) (one per model); default: each model's fresh init from `model_fn`.
        chunk_models: models trained together in one vmapped chunk (default: all).
        return_params: also return the stacked final parameters.
        on_chunk: called with (slice of model ids, chunk result) after each chunk.
        batch_plan: "own" (each model's batches over its examples with w_mi > 0, as `fit` on the
            subset) or "shared" (every model's batches over all N examples; examples with w_mi = 0
            stay in the batches with no loss contribution); see the module docstring.
    """
    if cfg.optimizer not in ("sgd", "adam", "adamw"):
        raise ConfigError(f"the retraining engine trains with sgd, adam or adamw, not {cfg.optimizer!r}; use fit() "
                          "for IVON")
    if batch_plan not in BATCH_PLANS:
        raise ConfigError(f"unknown batch_plan {batch_plan!r}; expected one of {BATCH_PLANS}")
    device = torch.device(cfg.device)
    lazy = isinstance(x, Rows) or is_stream(x)
    if lazy:
        ex = as_examples(x, y if isinstance(y, Rows) else None).on(device, None)
        x, y = ex.inputs, ex.labels
    masks = torch.as_tensor(masks)
    if masks.dim() != 2 or masks.shape[1] != len(x):
        raise ConfigError(f"masks must have shape (M, N={len(x)}), got {tuple(masks.shape)}")
    if len(y) != len(x):
        raise ConfigError(f"x has {len(x)} examples but y has {len(y)}")
    likelihood_for(likelihood, cfg.loss)  # ConfigError for a loss that does not fit
    if cfg.crop_padding > 0 or cfg.hflip:
        check_images(x, "--crop-padding / --hflip")
    if cfg.mixup_alpha > 0:
        raise ConfigError("the retraining engine does not train with mixup (--mixup-alpha): it would mix a model's "
                          "examples with those it leaves out; retrain with --mixup-alpha 0, or train single models "
                          "with fit")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if tuple(labels.shape) != tuple(masks.shape) or labels.is_floating_point():
            raise ConfigError(f"labels must be integer class labels of shape (M, N) = {tuple(masks.shape)}, "
                              f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long().to(cfg.device)
    weights = masks.float()
    if (weights < 0).any():
        raise ConfigError("mask weights must be non-negative")
    empty = (weights > 0).sum(1) == 0
    if empty.any():
        raise ConfigError(
            f"{int(empty.sum())} models have no training example (an all-False mask row), e.g. model "
            f"{int(empty.nonzero()[0])}"
        )
    n_models = len(masks)
    seeds = torch.as_tensor(cfg.seed + torch.arange(n_models) if seeds is None else seeds, dtype=torch.long)
    if len(seeds) != n_models:
        raise ConfigError(f"got {len(seeds)} seeds for {n_models} models")
    queries = {"train": (x, y)} if queries is None else queries
    queries = {q: _query_pair(v, device) for q, v in queries.items()}
    chunk_models = n_models if chunk_models is None else max(1, int(chunk_models))
    if not lazy:
        x, y = x.to(device), y.to(device)
    weights = weights.to(device)
    parts = []
    n_chunks = (n_models + chunk_models - 1) // chunk_models
    with progress_bar(n_chunks * cfg.epochs, f"ensemble of {n_models}", enabled=progress) as bar:
        for ids in chunks(n_models, chunk_models):
            part = _train_chunk(model_fn, x, y, weights[ids], seeds[ids], cfg, queries, init_params, ids,
                                keep_logits, return_params, likelihood, device, bar, batch_plan,
                                None if labels is None else labels[ids])
            if on_chunk is not None:
                on_chunk(ids, part)
            parts.append(part)
    return EnsembleResult.concat(parts)


def _query_pair(value, device: torch.device) -> tuple:
    """A query as (x, y): tensors as given, or the lazy `Rows` of a Dataset / DataLoader."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Rows):
        return value
    if is_stream(value):
        ex = as_examples(value, what="query").on(device, None)
        return ex.inputs, ex.labels
    return value


def _rows_of(x, it: Tensor):
    """x[it] for an (M, bs) index: tensors by one `index_select` of the M·bs rows (several times faster on a
    CPU than advanced indexing x[it]); lazy `Rows` gather the M·bs examples at once."""
    if not isinstance(x, Rows):
        return x.index_select(0, it.reshape(-1)).view(*it.shape, *x.shape[1:])
    return map_inputs(lambda t: t.reshape(*it.shape, *t.shape[1:]), x[it.reshape(-1)])


def _train_chunk(model_fn, x, y, weights, seeds, cfg, queries, init_params, ids, keep_logits, return_params,
                 likelihood, device, bar, batch_plan, labels=None) -> EnsembleResult:
    """Train one chunk of models on y, or on their own rows of `labels` (M, N)."""
    modules = [model_fn(int(s)) for s in seeds]
    base = modules[0].to(device)
    _check_module(base)
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    buffers = {n: b.to(device) for n, b in base.named_buffers()}
    fixed = {n: p.detach().to(device) for n, p in base.named_parameters() if not p.requires_grad}
    if init_params is None:
        params = _stack([{n: dict(m.named_parameters())[n].detach().to(device) for n in names} for m in modules])
    else:
        missing = set(names) - set(init_params)
        if missing:
            raise ConfigError(f"init_params lacks parameters {sorted(missing)}")
        params = {}
        for n in names:
            p = init_params[n].detach().to(device)
            shape = dict(base.named_parameters())[n].shape
            params[n] = p.expand(len(seeds), *shape).clone() if p.shape == shape else p[ids].clone()
    del modules
    n_m = weights.sum(1)
    if batch_plan == "shared":
        indices = [torch.arange(weights.shape[1])] * len(weights)
    else:
        indices = [row.nonzero().flatten().cpu() for row in weights]
    gens = [batch_generator(int(s)) for s in seeds]
    augment = cfg.crop_padding > 0 or cfg.hflip
    aug_gens = [augment_generator(int(s)) for s in seeds]
    consts = {**buffers, **fixed}
    objective = likelihood_for(likelihood, cfg.loss)

    def model_loss(p: Params, xb: Tensor, yb: Tensor, wb: Tensor) -> Tensor:
        out = functional_call(base, {**consts, **p}, (xb,))
        nll = objective.nll(out, yb)
        total = wb.sum()  # 0 only in skipped steps (their gradient is discarded): avoid 0/0
        return (wb * nll).sum() / torch.where(total > 0, total, torch.ones_like(total))

    # dropout: each model draws its own masks (vmap's randomness="different") from a generator seeded by
    # the chunk's seeds, so a chunk retrains the same (the masks differ from those `fit` draws alone)
    base.train()
    stochastic = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in base.modules())
    stacked = None if stochastic else _StackedMLP.of(base, names, consts, objective)
    grad_fn = stacked.grads if stacked is not None else vmap(grad(model_loss),
                                                             randomness="different" if stochastic else "error")
    opt = _FunctionalOptimizer(cfg, params, cfg.delta / n_m)
    rows = torch.arange(len(seeds), device=device).unsqueeze(1)
    plan_steps = [steps_per_epoch(len(idx), cfg.bs) for idx in indices]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if stochastic:
            torch.manual_seed(int(seeds[0]) * 1_000_003 + len(seeds))
        _train_epochs(cfg, params, opt, grad_fn, x, y, labels, weights, indices, gens, aug_gens, augment, rows,
                      plan_steps, device, bar)
    base.eval()  # the queries see the trained models as they predict (no dropout)

    def moved(t):
        return t if isinstance(t, Rows) else t.to(device)

    outputs = {q: query_outputs(base, params, consts, moved(qx), moved(qy), likelihood, keep_logits=keep_logits,
                                loss=cfg.loss, forward=None if stacked is None else stacked.forward)
               for q, (qx, qy) in queries.items()}
    outputs = {q: {k: v.cpu() for k, v in o.items()} for q, o in outputs.items()}
    return EnsembleResult(seeds.cpu(), outputs, {k: v.cpu() for k, v in params.items()} if return_params else None)


def _train_epochs(cfg, params, opt, grad_fn, x, y, labels, weights, indices, gens, aug_gens, augment, rows, plan_steps,
                  device, bar) -> None:
    """The engine's training loop: every model's minibatch of each step at once."""
    lazy_labels = isinstance(y, Rows)
    for epoch in range(cfg.epochs):
        index, valid = _epoch_plan(indices, cfg.bs, gens, cfg.fixed_batches)
        if augment:
            offsets, flips = _epoch_augment([len(i) for i in indices], index.shape, aug_gens, cfg)
        index, valid = index.to(device), valid.to(device)
        # the epoch's weights and labels of every model's batches in one gather each, and which models
        # step when (one device sync per epoch instead of one per step)
        wplan = weights[rows.unsqueeze(-1), index] * valid
        yplan = labels[rows.unsqueeze(-1), index] if labels is not None else None if lazy_labels else y[index]
        active = (wplan > 0).any(2)
        every = active.all(0).tolist()
        for t in range(index.shape[1]):
            it, wb = index[:, t], wplan[:, t]
            xb = _rows_of(x, it)
            yb = _rows_of(y, it) if yplan is None else yplan[:, t]
            if augment:  # every model's batch at once: (M * bs, C, H, W)
                xb = crop_flip(
                    xb.flatten(0, 1),
                    cfg.crop_padding,
                    None if offsets is None else offsets[:, t].flatten(0, 1),
                    None if flips is None else flips[:, t].flatten(0, 1),
                ).view_as(xb)
            opt.step(params, grad_fn(params, xb, yb, wb), _step_lr(cfg, epoch, t, plan_steps, device), active[:, t],
                     every[t])
        bar.advance(1)
