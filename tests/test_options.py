"""Checks declared with a setting (`modelsense.options.option(choices=, low=, ...)`, `check_fields`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from modelsense.errors import ConfigError
from modelsense.options import check_fields, ints, option


def _methods() -> tuple[str, ...]:
    return ("a", "b")


@dataclass(frozen=True)
class Spec:
    method: str = option("a", "a method", choices=_methods)
    kind: str = option("x", "a kind", choices=("x", "y"))
    n: int = option(1, "a count", low=1)
    rate: float = option(0.5, "a rate", above=0.0, high=1.0)
    widths: tuple[int, ...] = option((2, 4), "widths", parse=ints, low=1)
    limit: int | None = option(None, "an optional limit", low=1)
    flagged: bool = option(False, "an on/off pair", flag="--flagged/--no-flagged", choices=(False, True))

    def __post_init__(self) -> None:
        check_fields(self)


def test_defaults_and_values_inside_the_rules_pass():
    Spec()
    Spec(method="b", kind="y", n=5, rate=1.0, widths=(1, 8), limit=3, flagged=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "c"}, "--method must be one of a, b, received 'c'"),
    ({"kind": "z"}, "--kind must be one of x, y, received 'z'"),
    ({"n": 0}, "--n must be >= 1, received 0"),
    ({"rate": 0.0}, "--rate must be > 0, received 0.0"),
    ({"rate": 1.5}, "--rate must be <= 1, received 1.5"),
    ({"widths": (2, 0)}, "--widths must be >= 1, received 0 in (2, 0)"),
    ({"limit": 0}, "--limit must be >= 1, received 0"),
    ({"n": "many"}, "--n must be a number >= 1, received 'many'"),
])
def test_a_value_outside_the_rules_is_refused_naming_the_flag(kwargs, message):
    with pytest.raises(ConfigError) as err:
        Spec(**kwargs)
    assert str(err.value) == message


def test_the_flag_of_an_on_off_pair_is_its_first_half():
    with pytest.raises(ConfigError, match=r"^--flagged must be one of False, True, received 2$"):
        Spec(flagged=2)
