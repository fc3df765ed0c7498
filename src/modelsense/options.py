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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from modelsense.errors import ConfigError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | Any = MISSING,  # noqa: A002
           flag: str | None = None, short: str | None = None, parse: Callable[[str], Any] | None = None,
           show: Callable[[Any], str] | None = None, cli: bool = True) -> Any:
    """A dataclass field carrying its command-line declaration (see the module docstring)."""
    metadata = {"help": help, "flag": flag, "short": short, "parse": parse, "show": show, "cli": cli}
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


__all__ = ["MISSING", "flag_of", "floats", "ints", "joined", "names", "option"]
