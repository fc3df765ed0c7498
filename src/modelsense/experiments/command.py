"""One shape for every command.

A command is a frozen *spec* (a dataclass: `data`, `model`, `train`, where the model comes from —
trained here or `checkpoint` —, and the command's own options, each declared once with
`modelsense.options.option`) and two functions:

    check(spec) -> Prepared                         validate and load; nothing is written
    run(spec, prepared, run: RunDir, progress) -> metrics

`execute(command, spec, out)` calls `check`, opens the run directory (`RunDir.open`: refuses a used
`--out` unless `resume` / `overwrite`, locks it, marks the run's status) with config.json = the spec,
and calls `run` inside it. The command line is generated from the same `Command`
(`modelsense.cli.generate`), so options, defaults and help texts exist once.

A model is obtained in one way (`experiments.source.obtain_model`): trained from the spec's recipe
(and saved as model.pt in the run, so another command can score it with `--checkpoint`), or loaded
from the spec's `checkpoint`, whose recipe the spec must follow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsense.data import Dataset
from modelsense.errors import ConfigError
from modelsense.runs import RunDir, _jsonable, finished_metrics, run_status


@dataclass
class Prepared:
    """What `check` found and loaded: the dataset, values for config.json beside the spec (e.g. the
    dataset's summary), and anything else the run needs (`extra`)."""

    data: Dataset | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """A command: its name, spec, check and run functions, and how it is shown.

    Attributes:
        name: as typed ("noisy-labels", "mpe validation").
        spec: the spec dataclass; `spec()` must give the command's defaults.
        check, run: see the module docstring.
        summary: metrics -> the lines printed when the run finished.
        keep: the resumable state of a run (entries kept by `--resume`); empty: no `--resume`.
        resume_keys: the config keys a resumed run must share with the stored one (None: all).
        hide: dotted spec paths not offered on the command line (e.g. "data.corruption_ratio").
        help: the command's help text.
        training_losses: the training losses (`TrainConfig.loss`) the command's computations follow;
            with one, `--loss` is not offered, and `execute` refuses a spec (or a checkpoint's recipe)
            with another (e.g. curvature of the softmax likelihood on a sigmoid-trained model).
    """

    name: str
    spec: type
    check: Callable[[Any], Prepared]
    run: Callable[[Any, Prepared, RunDir, bool], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str] | None = None
    keep: tuple[str, ...] = ()
    resume_keys: tuple[str, ...] | None = None
    hide: frozenset[str] = frozenset()
    help: str = ""
    training_losses: tuple[str, ...] = ("cross_entropy",)

    @property
    def resumable(self) -> bool:
        return bool(self.keep)

    @property
    def hidden(self) -> frozenset[str]:
        """The spec paths not offered on the command line: `hide`, and `train.loss` where the command
        follows one training loss only."""
        return self.hide | (frozenset({"train.loss"}) if len(self.training_losses) == 1 else frozenset())

    def check_training_loss(self, spec: Any) -> None:
        """ConfigError when the spec trains (or scores a checkpoint trained) with a loss the command
        does not follow."""
        loss = getattr(getattr(spec, "train", None), "loss", None)
        if loss is not None and loss not in self.training_losses:
            raise ConfigError(f"{self.name} computes with the {' or '.join(self.training_losses)} loss, but the model "
                              f"is trained with loss {loss!r} (a checkpoint's recipe or --loss); train it with "
                              f"--loss {self.training_losses[0]}")


def spec_config(spec: Any) -> dict[str, Any]:
    """The spec as config.json holds it (plain JSON values)."""
    return _jsonable(dataclasses.asdict(spec))


def execute(command: Command, spec: Any, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Check `spec`, then run `command` into the run directory `out` (see the module docstring)."""
    command.check_training_loss(spec)
    prepared = command.check(spec)
    config = {**spec_config(spec), **_jsonable(prepared.config)}
    with RunDir.open(out, command.name, config, resume=resume, overwrite=overwrite, keep=command.keep,
                     resume_keys=command.resume_keys) as run:
        start = time.perf_counter()
        metrics = command.run(spec, prepared, run, progress)
        metrics.setdefault("seconds_total", time.perf_counter() - start)
        run.write_metrics(metrics)
        return metrics


def execute_or_reuse(command: Command, spec: Any, out: str | Path, *, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """The metrics of the finished run `out` when `resume`; else `execute` into `out`, continuing an
    unfinished run of a resumable command when `resume`, starting it again (`overwrite`) otherwise.
    The demo's sections run their commands this way."""
    if resume and (done := finished_metrics(out)):
        return done
    go_on = resume and command.resumable and run_status(out) is not None
    return execute(command, spec, out, resume=go_on, overwrite=not go_on, progress=progress)


# -- stored state keyed by its arguments ---------------------------------------------------------
def cached(path: str | Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]],
           what: str = "stored result") -> tuple[dict[str, Any], bool]:
    """(arrays, reused): the arrays of the .npz `path` if it was computed with `key`, else
    `compute()` saved there with `key`. A stored file with another key is refused (kronfluence's
    rule: stored state is reused only with the arguments it was computed with), naming what differs."""
    import numpy as np

    from modelsense.runs import atomic_write, config_differences

    path = Path(path)
    key = json.loads(json.dumps(_jsonable(key)))
    if path.exists():
        try:
            with np.load(path) as f:
                stored = json.loads(str(f["__key__"]))
                arrays = {k: f[k] for k in f.files if k != "__key__"}
        except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed
            path.unlink()
            stored, arrays = None, {}
            del exc
        if stored is not None:
            diff = config_differences(stored, key)
            if diff:
                raise ConfigError(f"the {what} in {path} was computed with other arguments: {'; '.join(diff)}; "
                                  "start the run again with --overwrite, or use another --out")
            return arrays, True
    arrays = compute()
    atomic_write(path, lambda f: np.savez(f, __key__=np.array(json.dumps(key)), **arrays))
    return arrays, False


__all__ = ["Command", "Prepared", "cached", "execute", "execute_or_reuse", "spec_config"]
