"""A user's own code named on the command line: `path/to/file.py:factory` or `package.module:factory`.

    --model examples/my_model.py:make_model    a callable(input_shape=, num_classes=) -> nn.Module
    --dataset examples/my_data.py:make_data    a callable() -> (train, test) map-style datasets of (x, y)

`is_reference(text)` tells such a reference from a built-in name or a data file; `load_callable`
imports it (a file by its path, a module from sys.path) and returns the callable, with one clear
message for a missing file, a module that fails to import, a missing name or something not callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelsense.errors import ConfigError

_LOADED: dict[str, Any] = {}


def is_reference(text: Any) -> bool:
    """Whether `text` names a callable ("file.py:name" or "package.module:name")."""
    if not isinstance(text, str) or text.count(":") != 1:
        return False
    where, name = text.rsplit(":", 1)
    if not where or not name.isidentifier():
        return False
    return where.endswith(".py") or all(part.isidentifier() for part in where.split("."))


def load_callable(text: str, what: str) -> Callable[..., Any]:
    """The callable `text` names; `what` says what it is for (in messages)."""
    if not is_reference(text):
        raise ConfigError(f"{what} {text!r}: expected path/to/file.py:function or package.module:function")
    where, name = text.rsplit(":", 1)
    module = _module(where, what)
    if not hasattr(module, name):
        defined = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(
            f"{what} {text!r}: {where} defines no {name!r} (it defines: {', '.join(defined) or 'nothing callable'})"
        )
    fn = getattr(module, name)
    if not callable(fn):
        raise ConfigError(f"{what} {text!r}: {name} is a {type(fn).__name__}, not a function or class")
    return fn


def _module(where: str, what: str) -> Any:
    if where in _LOADED:
        return _LOADED[where]
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{what}: file {where} not found (relative paths are from the current folder)")
            spec = importlib.util.spec_from_file_location(f"modelsense_user_{abs(hash(str(path)))}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything while importing
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{what}: importing {where} failed: {type(exc).__name__}: {first}") from None
    _LOADED[where] = module
    return module


def call(fn: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    """`fn(**kwargs)`, an exception of the user's code reported as one line naming `what`."""
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{what} failed: {type(exc).__name__}: {first}") from None


__all__ = ["call", "is_reference", "load_callable"]
