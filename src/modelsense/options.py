"""Settings declared once: a dataclass field with its help text and command-line flag.

Every setting a user can pass (data, model, training, method and command options) is a field of a
frozen dataclass declared with `option(default, help, ...)`. The command line reads the fields
(`modelsense.cli.generate`): the flag, the help text and the default shown in `--help` are the
field's, so they cannot drift apart.

    >>> @dataclass(frozen=True)
    ... class Sweep:
    ...     widths: tuple[int, ...] = option((2, 4), "hidden widths to train", parse=ints)
    ...     k: int = option(20, "top eigenvalues (Lanczos)")

Metadata keys: `help`; `flag` (default: `--` and the field name with dashes; "--a/--no-a" for an
on/off pair); `short` (e.g. "-d"); `parse` (text -> value, for fields that are not a plain int,
float, str or bool, e.g. comma-separated lists) with `show` (value -> text, the default in
`--help`); `cli=False` keeps a field off the command line.

Checks declared with the field, run by `check_fields(spec)` (a spec's `__post_init__` calls it):
`choices` (a tuple, or a callable giving one, e.g. a registry's names) and bounds `low` / `high`
(inclusive; `above` / `below` exclusive). A tuple-valued field is checked element by element; None
passes where it is the default. The message names the flag, the rule and the value received.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from modelsense.errors import ConfigError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | Any = MISSING,  # noqa: A002
           flag: str | None = None, short: str | None = None, parse: Callable[[str], Any] | None = None,
           show: Callable[[Any], str] | None = None, cli: bool = True,
           choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None, low: float | None = None,
           high: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field carrying its command-line declaration and checks (see the module docstring)."""
    metadata = {"help": help, "flag": flag, "short": short, "parse": parse, "show": show, "cli": cli,
                "choices": choices, "low": low, "high": high, "above": above, "below": below}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def ints(text: str | None, what: str = "the option") -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3); '' -> ()."""
    if not text:
        return ()
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, e.g. 1,2; received {text!r}") from None


def floats(text: str | None, what: str = "the option") -> tuple[float, ...]:
    """'1,1e2' -> (1.0, 100.0); '' -> ()."""
    if not text:
        return ()
    try:
        return tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, e.g. 1,100; received {text!r}") from None


def names(text: str | None, what: str = "the option") -> tuple[str, ...]:
    """'a, b' -> ('a', 'b')."""
    return tuple(t.strip() for t in str(text or "").split(",") if t.strip())


def joined(values: Any) -> str:
    """(1, 2) -> '1,2' (the default of a list option as `--help` shows it)."""
    return ",".join(str(v) for v in values) if values else ""


def flag_of(field: dataclasses.Field) -> str:
    """The long flag of a field: its metadata's, else `--` + the name with dashes."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _rule_broken(value: Any, meta: Any) -> str | None:
    """What `value` breaks of the field's declared checks (None: nothing)."""
    choices = meta.get("choices")
    if choices is not None:
        allowed = tuple(choices() if callable(choices) else choices)
        if value not in allowed:
            return f"must be one of {', '.join(map(str, allowed))}"
    bounds = (("low", lambda v, b: v >= b, ">="), ("above", lambda v, b: v > b, ">"),
              ("high", lambda v, b: v <= b, "<="), ("below", lambda v, b: v < b, "<"))
    for key, holds, sign in bounds:
        bound = meta.get(key)
        if bound is not None:
            try:
                ok = holds(value, bound)
            except TypeError:
                return f"must be a number {sign} {bound:g}"
            if not ok:
                return f"must be {sign} {bound:g}"
    return None


def check_fields(spec: Any) -> None:
    """ConfigError naming the first field of the dataclass `spec` whose value breaks its declared
    `choices` / `low` / `high` / `above` / `below` (tuple values element by element; None passes
    where it is the field's default)."""
    for f in dataclasses.fields(spec):
        meta = f.metadata
        if not any(meta.get(k) is not None for k in ("choices", "low", "high", "above", "below")):
            continue
        value = getattr(spec, f.name)
        if value is None and f.default is None:
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            broken = _rule_broken(v, meta)
            if broken:
                received = f"{value!r}" if v is value else f"{v!r} in {value!r}"
                raise ConfigError(f"{flag_of(f).split('/')[0]} {broken}, received {received}")


__all__ = ["MISSING", "check_fields", "flag_of", "floats", "ints", "joined", "names", "option"]
