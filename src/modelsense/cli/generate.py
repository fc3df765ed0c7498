"""Typer commands generated from a `Command` (modelsense.experiments.command).

Every field of the command's spec that carries a command-line declaration (`modelsense.options.option`)
becomes an option: the field's flag, help text, and default (the value in `Command.spec()`, which
holds the command's own defaults, e.g. a longer training for `noisy-labels`). Fields whose type is a
dataclass (data, model, train, method settings) are walked into. Beside them every command has
`--out`, `--overwrite`, `--resume` (commands that can continue) and `--quiet`.

With `--checkpoint`, the data, model and training settings come from the recipe the checkpoint was
made with, except those given on the command line (refused when they contradict it) and those free
of the recipe (`experiments.train.FREE_OF_RECIPE`: where the data lie, the device).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from modelsense.errors import ConfigError
from modelsense.options import flag_of

_CONTEXT = "typer_context"
_ALWAYS = ("out", "overwrite", "resume", "quiet")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option: the spec path it fills, the Python parameter name, flag, type, default, help, parser."""

    path: tuple[str, ...]
    param: str
    flags: tuple[str, ...]
    hint: Any
    default: Any
    help: str
    parse: Any


def _is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _optional_inner(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def leaves(cls: type, instance: Any, hide: frozenset[str] = frozenset(), prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """The command-line options of the spec class `cls` with defaults from `instance`."""
    out: list[Leaf] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        hint = hints[f.name]
        value = getattr(instance, f.name)
        if _is_group(_optional_inner(hint)[0]) and value is not None:
            out.extend(leaves(type(value), value, hide, path))
            continue
        if not f.metadata.get("help") or not f.metadata.get("cli", True) or ".".join(path) in hide:
            continue
        flag = flag_of(f)
        flags = (flag, *([f.metadata["short"]] if f.metadata.get("short") else []))
        param = flag.split("/")[0].lstrip("-").replace("-", "_")
        parse = f.metadata.get("parse")
        if parse is not None:
            show = f.metadata.get("show") or str
            inner_hint = str | None if value is None else str
            default = None if value is None else show(value)
        else:
            inner_hint, default = hint, value
            inner, optional = _optional_inner(hint)
            if inner is Path or (isinstance(inner, type) and issubclass(inner, Path)):
                inner_hint = Path | None if optional else Path
        out.append(Leaf(path, param, flags, inner_hint, default, f.metadata["help"], parse))
    return out


def _build(cls: type, instance: Any, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()) -> Any:
    """`cls` with the option values at their paths, the other fields as in `instance`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        current = getattr(instance, f.name)
        if _is_group(_optional_inner(hints[f.name])[0]) and current is not None:
            kwargs[f.name] = _build(type(current), current, values, path)
        elif path in values:
            kwargs[f.name] = values[path]
        else:
            kwargs[f.name] = current
    return cls(**kwargs)


def _recipe_values(checkpoint: Path, values: dict[tuple[str, ...], Any], given: set[tuple[str, ...]],
                   leaf_of: dict[tuple[str, ...], Leaf]) -> dict[tuple[str, ...], Any]:
    """`values` with the data / model / training settings of the checkpoint's recipe wherever an
    option was not given; a given option that contradicts the recipe is refused."""
    from modelsense.experiments.source import FREE_OF_RECIPE, checkpoint_recipe

    recipe, _, _ = checkpoint_recipe(checkpoint)
    out = dict(values)
    clashes = []
    for group in ("data", "model", "train"):
        stored = getattr(recipe, group)
        if stored is None:
            continue
        for f in dataclasses.fields(stored):
            path = (group, f.name)
            if f.name in FREE_OF_RECIPE[group]:
                continue
            value = getattr(stored, f.name)
            if path in given:
                a = values[path]
                if _plain(a) != _plain(value):
                    clashes.append(f"{leaf_of[path].flags[0].split('/')[0]} {a!r} (the checkpoint's: {value!r})")
            else:
                out[path] = value
    if clashes:
        raise ConfigError(f"--checkpoint {checkpoint} was made with another recipe: {'; '.join(clashes)}; a command "
                          "scoring a checkpoint uses the data, model and training recipe it was made with: drop these "
                          "options")
    return out


def _plain(v: Any) -> Any:
    import json

    return json.dumps(v, default=str) if not isinstance(v, (list, tuple)) else json.dumps(list(v), default=str)


def add_command(target: typer.Typer, command: Any, name: str | None = None) -> None:
    """Register `command` (an `experiments.command.Command`) on `target` under `name` (default: the
    last word of command.name)."""
    from modelsense.cli import options as o

    defaults = command.spec()
    opts = leaves(command.spec, defaults, command.hidden)
    seen: dict[str, Leaf] = {}
    for leaf in opts:
        if leaf.param in seen or leaf.param in _ALWAYS:
            raise TypeError(
                f"{command.name}: option {leaf.flags[0]} is declared twice ({seen[leaf.param].path} and {leaf.path})"
            )
        seen[leaf.param] = leaf
    leaf_of = {leaf.path: leaf for leaf in opts}
    params = [inspect.Parameter(leaf.param, inspect.Parameter.KEYWORD_ONLY, default=leaf.default,
                                annotation=Annotated[leaf.hint, typer.Option(*leaf.flags, help=leaf.help)])
              for leaf in opts]
    params.append(inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=o.Out,
                                    default=Path("runs") / command.name.replace(" ", "/").replace("-", "_")))
    if command.resumable:
        params.append(inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=o.Resume, default=False))
    params.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=o.Overwrite, default=False))
    params.append(inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=o.Quiet, default=False))
    params.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def callback(**kwargs: Any) -> None:
        from modelsense.cli.app import console
        from modelsense.experiments.command import execute
        from modelsense.progress import set_quiet

        ctx = kwargs.pop(_CONTEXT, None)
        out, overwrite, quiet = kwargs.pop("out"), kwargs.pop("overwrite"), kwargs.pop("quiet")
        resume = kwargs.pop("resume", False)
        given = {leaf.path for leaf in opts if _given(ctx, leaf, kwargs)}
        values = {}
        for leaf in opts:
            raw = kwargs[leaf.param]
            values[leaf.path] = leaf.parse(raw, leaf.flags[0]) if leaf.parse is not None and raw is not None else raw
        checkpoint = values.get(("checkpoint",))
        if checkpoint is not None:
            values = _recipe_values(Path(checkpoint), values, given, leaf_of)
        spec = _build(command.spec, defaults, values)
        set_quiet(quiet)
        metrics = execute(command, spec, out, resume=resume, overwrite=overwrite, progress=not quiet)
        if command.summary is not None:
            console.print(command.summary(metrics), highlight=False)
        console.print(f"-> {out}", highlight=False)

    callback.__signature__ = inspect.Signature(params)
    callback.__name__ = (name or command.name.split()[-1]).replace("-", "_")
    callback.__doc__ = command.help
    target.command(name or command.name.split()[-1], help=command.help)(callback)


def _given(ctx: Any, leaf: Leaf, kwargs: dict[str, Any]) -> bool:
    """Whether the option was given (command line or environment), not left at its default."""
    if hasattr(ctx, "get_parameter_source"):
        source = ctx.get_parameter_source(leaf.param)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
    return kwargs[leaf.param] != leaf.default


__all__ = ["Leaf", "add_command", "leaves"]
