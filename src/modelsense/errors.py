"""Errors that modelsense raises on bad input.

Every check at a boundary (files, arrays, options) raises one of these with a message that says what
was expected, what was received and how to fix it, before any work starts.
"""


class ModelsenseError(Exception):
    """Base class of every error raised on purpose by modelsense."""


class DataError(ModelsenseError, ValueError):
    """A dataset could not be loaded or failed validation."""


class ConfigError(ModelsenseError, ValueError):
    """An option or a combination of options is invalid."""


def shown(value: object) -> str:
    """`value` as a message shows it: a numpy or torch scalar as the plain number (`nan`, `0.5`, never
    `np.float64(nan)` or `tensor(0.5)`), lists, tuples and dicts element by element, a larger array
    or tensor by its shape and range, anything else as `repr`."""
    if isinstance(value, (list, tuple)):
        inner = ", ".join(shown(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shown(k)}: {shown(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "shape") and hasattr(value, "item"):  # numpy / torch array or scalar, without importing them
        n = 1
        for d in value.shape:
            n *= int(d)
        if n == 1:
            return repr(value.item())
        if n == 0:
            return f"an empty array of shape {tuple(value.shape)}"
        return f"an array of shape {tuple(value.shape)} in [{shown(value.min())}, {shown(value.max())}]"
    return repr(value)
