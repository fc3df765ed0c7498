"""Per-module spectra (`module_spectra`, `spectrum --by-module`) against the eigenvalues of the dense
Hessian's / GGN's diagonal blocks on a tiny MLP."""

import pytest
import torch
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import SpectrumConfig, dense_ggn, dense_hessian, effective_dimension, module_spectra
from modelsense.curvature.spectrum import module_model
from modelsense.errors import ConfigError

DT = torch.float64


def mlp_problem(n=24, seed=0, trainable=None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(n, 4, dtype=DT)
    return FunctionalModel(net, trainable=trainable), x, torch.randint(0, 3, (n,))


@pytest.mark.parametrize("matrix, dense", [("hessian", dense_hessian), ("ggn", dense_ggn)])
def test_module_spectra_are_the_eigenvalues_of_the_dense_diagonal_blocks(matrix, dense):
    fm, x, y = mlp_problem()
    D = dense(fm, x, y)
    spectra = module_spectra(fm, x, y, SpectrumConfig(k=6, matrix=matrix, s=(1.0,), trace_samples=40))
    assert list(spectra) == ["0", "2"]
    traces = 0.0
    for name, idx in fm.spec.modules.items():
        block = D[idx][:, idx]
        lam = torch.linalg.eigvalsh(block).flip(0)
        got = spectra[name]
        assert got.n_params == len(idx) == {"0": 25, "2": 18}[name]
        torch.testing.assert_close(got.eigenvalues, lam[:6], rtol=1e-5, atol=1e-8 * float(lam.abs().max()))
        assert got.effective_dimension[1.0] == pytest.approx(effective_dimension(lam[:6], 1.0), rel=1e-5)
        assert abs(got.trace.estimate - float(block.trace())) <= 5 * got.trace.standard_error + 1e-9
        traces += float(block.trace())
    assert traces == pytest.approx(float(D.trace()), rel=1e-10)  # the blocks' traces add up to the whole


def test_module_spectra_clamp_k_to_the_module_and_keep_other_modules_fixed():
    fm, x, y = mlp_problem(trainable=lambda n: n.endswith("weight"))  # weights only: 20 + 15 parameters
    D = dense_hessian(fm, x, y)
    spectra = module_spectra(fm, x, y, SpectrumConfig(k=18, s=(1.0,)))
    assert {m: s.n_params for m, s in spectra.items()} == {"0": 20, "2": 15}
    idx = fm.spec.modules["2"]
    lam = torch.linalg.eigvalsh(D[idx][:, idx]).flip(0)
    assert len(spectra["2"].eigenvalues) == 15  # every eigenvalue of the 15 x 15 block
    torch.testing.assert_close(spectra["2"].eigenvalues, lam, rtol=1e-5, atol=1e-8 * float(lam.abs().max()))
    assert list(module_model(fm, "2").params) == ["2.weight"]
    with pytest.raises(ConfigError, match="module 'nope' holds none of the parameters.*modules: 0, 2"):
        module_model(fm, "nope")
