"""Record what an optimizer knows during training: `OptimizerStateRecorder` snapshots the parameters
and the optimizer state that the optimizer-state posteriors read (`curvature.ivon_posterior`,
`curvature.adam_posterior`), and `stand_in_optimizer` rebuilds an object those posteriors accept
from a snapshot."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Self

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from modelsense.errors import ConfigError


class OptimizerStateRecorder:
    """Copies the optimizer state that the posteriors read (IVON: hess, ess, weight_decay; Adam:
    exp_avg_sq) and the parameters after given optimizer steps, through torch's global optimizer
    step hook (so `fit` needs no changes). Use as a context manager around `fit`.

    `snapshots[f"iteration_{t}"]` is taken after t steps; `take(key)` snapshots on demand (e.g. in
    `fit`'s `on_epoch`). Each snapshot: {"params": name -> tensor, "state": ..., "kind": ivon|adam|sgd}.
    The module may be given later with `watch(module)` (e.g. as `obtain_model`'s `setup`, which builds it).
    """

    def __init__(self, module: nn.Module | None = None, iterations: tuple[int, ...] = ()) -> None:
        self.module: nn.Module | None = None
        self.names: dict[int, str] = {}
        self.iterations = set(iterations)
        self.optimizer = None
        self.steps = 0
        self.snapshots: dict[str, dict[str, Any]] = {}
        self._handle = None
        if module is not None:
            self.watch(module)

    def watch(self, module: nn.Module) -> Self:
        """Record the optimizer steps on the parameters of `module` (the one being trained); returns self."""
        self.module = module
        self.names = {id(p): n for n, p in module.named_parameters()}
        return self

    def __enter__(self) -> Self:
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _ours(self, optimizer) -> bool:
        return any(id(p) in self.names for g in optimizer.param_groups for p in g["params"])

    def _hook(self, optimizer, args, kwargs) -> None:
        if not self._ours(optimizer):
            return
        self.optimizer = optimizer
        self.steps += 1
        if self.steps in self.iterations:
            self.take(f"iteration_{self.steps}")

    def take(self, key: str) -> dict[str, Any]:
        opt = self.optimizer
        if opt is None:
            raise ConfigError("no optimizer step was recorded yet")
        params = {self.names[id(p)]: p.detach().clone() for g in opt.param_groups for p in g["params"]}
        if all("hess" in g for g in opt.param_groups):
            state = [{"hess": g["hess"].detach().clone(), "ess": g["ess"], "weight_decay": g["weight_decay"],
                      "names": [self.names[id(p)] for p in g["params"]]} for g in opt.param_groups]
            kind = "ivon"
        elif all("exp_avg_sq" in opt.state.get(p, {}) for g in opt.param_groups for p in g["params"]):
            state = {
                self.names[id(p)]: opt.state[p]["exp_avg_sq"].detach().clone()
                for g in opt.param_groups
                for p in g["params"]
            }
            kind = "adam"
        else:
            state, kind = None, "sgd"
        snap = {"params": params, "state": state, "kind": kind, "step": self.steps}
        self.snapshots[key] = snap
        return snap


def stand_in_optimizer(module: nn.Module, snapshot: dict[str, Any]):
    """An object with the optimizer attributes the curvature posteriors read, rebuilt from a snapshot."""
    named = dict(module.named_parameters())
    if snapshot["kind"] == "ivon":
        groups = [{"params": [named[n] for n in g["names"]], "hess": g["hess"], "ess": g["ess"],
                   "weight_decay": g["weight_decay"]} for g in snapshot["state"]]
        return SimpleNamespace(param_groups=groups, state={})
    if snapshot["kind"] == "adam":
        return SimpleNamespace(param_groups=[{"params": list(named.values())}],
                               state={named[n]: {"exp_avg_sq": v} for n, v in snapshot["state"].items()})
    raise ConfigError("--optim-var needs an IVON or Adam optimizer state")

