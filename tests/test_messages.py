"""Messages show values as a user reads them: no numpy / torch type wrappers (`np.float64(nan)`)."""

import numpy as np
import pytest
import torch

from modelsense.attribution.base import check_positive
from modelsense.curvature._common import check_damping
from modelsense.errors import ConfigError, shown
from modelsense.report import _fmt


def test_shown_unwraps_numpy_and_torch_scalars():
    assert shown(np.float64("nan")) == "nan" and shown(np.int64(3)) == "3" and shown(torch.tensor(0.5)) == "0.5"
    assert shown([np.float64(1.5), 2]) == "[1.5, 2]" and shown((np.int64(1),)) == "(1,)"
    assert shown({"a": np.float32(0.25)}) == "{'a': 0.25}" and shown("x") == "'x'"
    assert shown(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == "an array of shape (2, 2) in [1.0, 4.0]"


@pytest.mark.parametrize("value", [np.float64("nan"), torch.tensor(float("nan"))])
def test_numeric_checks_show_the_plain_number(value):
    with pytest.raises(ConfigError, match=r"received nan$"):
        check_positive("damping", value)
    with pytest.raises(ConfigError) as info:
        check_damping(value, strictly_positive=False, what="full inverse")
    assert "received nan;" in str(info.value) and "np." not in str(info.value) and "tensor(" not in str(info.value)


def test_report_formats_numpy_metrics_as_numbers():
    assert _fmt(np.float64(0.123456)) == "0.1235" and _fmt([np.float64(0.5), 0.25]) == "[0.5, 0.25]"
    assert _fmt({"100": np.float64(2.0)}) == "100: 2" and _fmt(list(range(20))) == "[20 values]"
    assert _fmt("a<b") == "a&lt;b"
