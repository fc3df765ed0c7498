"""The loss along θ + t·d (curvature/perturbation.py) against the dense Hessian and direct evaluation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import (
    CurvatureConfig,
    SpectrumConfig,
    build_curvature,
    compute_spectrum,
    dense_hessian,
)
from modelsense.curvature.perturbation import (
    complement_directions,
    directional_curvature,
    first_crossing,
    interpolate,
    random_directions,
    scan_directions,
    symmetric_rise,
)
from modelsense.errors import ConfigError

DT = torch.float64


def problem(n=30, seed=0, trainable=None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(n, 4, dtype=DT)
    return FunctionalModel(net, trainable=trainable), x, torch.randint(0, 3, (n,))


def summed_loss(model, x, y, flat):
    return float(model.loss(model.spec.unflatten(flat), x, y, reduction="sum"))


def test_second_derivative_along_an_eigenvector_is_its_eigenvalue():
    model, x, y = problem()
    H = dense_hessian(model, x, y)
    spectrum = compute_spectrum(model, x, y, SpectrumConfig(k=3, lanczos_tol=1e-10))
    lam, V = spectrum.eigenvalues, spectrum.eigenvectors
    dense_lam = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(lam, dense_lam.flip(0)[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(H @ V, V * lam, rtol=1e-6, atol=1e-8)  # eigenvectors, in the order of spec
    theta, h = model.spec.flatten(model.params), 1e-4
    for i in range(3):
        v = V[:, i]
        second = (summed_loss(model, x, y, theta + h * v) - 2 * summed_loss(model, x, y, theta)
                  + summed_loss(model, x, y, theta - h * v)) / h**2
        assert second == pytest.approx(float(lam[i]), rel=1e-5)
    K = build_curvature(model, x, y, CurvatureConfig(matrix="hessian", structure="implicit"))
    D = torch.cat([V, random_directions(model.n_params, 2, torch.Generator().manual_seed(1), DT)], dim=1)
    torch.testing.assert_close(directional_curvature(K, D), torch.einsum("pm,pq,qm->m", D, H, D), rtol=1e-8, atol=1e-10)


def test_directions_are_unit_seeded_and_the_bottom_ones_orthogonal_to_the_top():
    P = 40
    first = random_directions(P, 3, torch.Generator().manual_seed(5))
    assert first.shape == (P, 3) and first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=0), torch.ones(3))
    assert torch.equal(first, random_directions(P, 3, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, random_directions(P, 3, torch.Generator().manual_seed(6)))
    V, _ = torch.linalg.qr(torch.randn(P, 6, dtype=DT))
    B = complement_directions(V, 4, torch.Generator().manual_seed(0))
    assert B.shape == (P, 4) and B.dtype == DT
    torch.testing.assert_close(B.norm(dim=0), torch.ones(4, dtype=DT))
    assert float((V.T @ B).abs().max()) < 1e-13
    with pytest.raises(ConfigError, match="span all 6 dimensions"):
        complement_directions(torch.eye(6, dtype=DT), 1, torch.Generator())


@pytest.mark.parametrize("weights_only", [False, True])
def test_scan_equals_direct_evaluation_of_the_moved_network(weights_only):
    trainable = (lambda n: n.endswith("weight")) if weights_only else None
    model, x, y = problem(trainable=trainable)
    P = model.n_params
    assert P == (4 * 5 + 5 * 3 if weights_only else 4 * 5 + 5 + 5 * 3 + 3)
    D = random_directions(P, 2, torch.Generator().manual_seed(2), DT) * 3
    t = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0], dtype=DT)
    scan = scan_directions(model, D, t, x, y, chunk_size=7)
    base = model.module(x).argmax(-1)
    for i in range(2):
        for j in range(len(t)):
            net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
            net.load_state_dict(model.module.state_dict())
            moved = model.spec.unflatten(model.spec.flatten(model.params) + t[j] * D[:, i])
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if name in moved:
                        p.copy_(moved[name])
                out = net(x)
            assert float(scan.loss[i, j]) == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-12)
            assert float(scan.accuracy[i, j]) == float((out.argmax(-1) == y).double().mean())
            assert float(scan.agreement[i, j]) == float((out.argmax(-1) == base).double().mean())
    assert torch.all(scan.agreement[:, 2] == 1) and torch.equal(scan.t, t)
    with pytest.raises(ConfigError, match="directions must have shape"):
        scan_directions(model, D[:-1], t, x, y)


def test_symmetric_rise_removes_the_odd_part_and_crossings_interpolate():
    t = torch.linspace(-2, 2, 9, dtype=DT)
    curves = torch.stack([3 * t**2 + 5 * t + 1, t**3 + 2])  # rises: 3t², 0
    pos, rise = symmetric_rise(t, curves)
    torch.testing.assert_close(pos, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=DT))
    torch.testing.assert_close(rise, torch.stack([3 * pos**2, torch.zeros(5, dtype=DT)]))
    assert first_crossing(pos, 2 * pos, 0.5) == pytest.approx(0.25)  # between t = 0 and the first point
    assert first_crossing(pos, 2 * pos, 1.0) == pytest.approx(0.5)
    assert first_crossing(pos, 2 * pos, 3.0) == pytest.approx(1.5)
    assert first_crossing(pos, 2 * pos, 2.5) == pytest.approx(1.25)
    assert first_crossing(pos, 2 * pos, 4.5) is None
    # a curve already above the level at the first t > 0: the crossing lies between 0 and that t
    steep = symmetric_rise(t, (1 + 10 * t**2)[None])[1][0]
    assert first_crossing(pos, steep, 1.0) == pytest.approx(0.2)
    torch.testing.assert_close(interpolate(pos, torch.stack([2 * pos]), 1.25), torch.tensor([2.5], dtype=DT))
    with pytest.raises(ConfigError, match="symmetric about 0"):
        symmetric_rise(torch.linspace(-1, 2, 5, dtype=DT), curves[:, :5])
    with pytest.raises(ConfigError, match="symmetric about 0"):
        symmetric_rise(torch.linspace(-1, 1, 4, dtype=DT), curves[:, :4])


# -- the whole study (perturbation_study) --------------------------------------------------------
def test_study_against_the_dense_hessian_and_direct_evaluation():
    from modelsense.curvature.perturbation import describe_perturbation, perturbation_study

    model, x, y = problem(n=40)
    xt, yt = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    H = dense_hessian(model, x, y)
    lam, V = torch.linalg.eigh(H)
    lam, V = lam.flip(0)[:4], V.flip(1)[:, :4]
    t = torch.linspace(-2, 2, 5, dtype=DT)
    cfg = SpectrumConfig(k=4, lanczos_tol=1e-10)
    study = perturbation_study(model, x, y, cfg, {"train": (x, y), "test": (xt, yt)}, t, 2, 1, 2, seed=3,
                               vectors=(V, lam))
    assert study.names == ["v1", "v2", "bottom 1", "random 1", "random 2"]
    assert study.kinds == ["top", "top", "bottom", "random", "random"]
    torch.testing.assert_close(study.curvature[:2], lam[:2], rtol=1e-8, atol=1e-10)  # vᵀHv = λ
    theta = model.spec.flatten(model.params)

    def mean_loss(flat, xs, ys):
        return float(model.loss(model.spec.unflatten(flat), xs, ys, reduction="sum")) / len(ys)

    # the curve along v_2 on the test set is the loss of the moved model
    for j in range(5):
        assert float(study.scans["test"].loss[1, j]) == pytest.approx(mean_loss(theta + t[j] * V[:, 1], xt, yt),
                                                                      rel=1e-10)
    m = study.metrics()
    loss = study.scans["train"].loss
    rise = ((loss[:, 3:] + loss[:, :2].flip(1)) / 2 - loss[:, 2:3]) / loss[0, 2]  # at t = 1, 2
    assert m["rise_at_t_max"]["top"] == pytest.approx(rise[:2, -1].tolist())
    assert m["rise_at_t_max"]["bottom"] == pytest.approx(float(rise[2, -1]))
    assert m["rise_at_t_max"]["random"] == pytest.approx(float(rise[3:, -1].mean()))
    assert m["train_loss_at_0"] == pytest.approx(mean_loss(theta, x, y)) and m["k"] == 4
    assert set(study.arrays()) == {"t", "names", "kinds", "curvature", "eigenvalues", *(
        f"{s}_{q}" for s in ("train", "test") for q in ("loss", "accuracy", "agreement"))}
    # computing the top 4 here instead gives the same curvature along v_1, v_2 (eigenvectors up to sign)
    computed = perturbation_study(model, x, y, cfg, {"train": (x, y), "test": (xt, yt)}, t, 2, 1, 2, seed=3)
    torch.testing.assert_close(computed.curvature[:2], lam[:2], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(computed.eigenvalues, lam, rtol=1e-6, atol=1e-8)
    text = describe_perturbation({**m, "matrix": "hessian", "reduction": "sum", "t_max": 2.0})
    assert "curvature dᵀKd (hessian, sum loss)" in text and f"{float(lam[0]):.3g}" in text
    # no top direction: no t_double, and the summary says so
    only_random = perturbation_study(model, x, y, cfg, {"train": (x, y), "test": (xt, yt)}, t, 0, 0, 1,
                                     vectors=(V, lam)).metrics()
    assert only_random["t_double"] is None and only_random["curvature_by_kind"]["bottom"] is None
    assert "does not double" in describe_perturbation({**only_random, "matrix": "hessian", "reduction": "sum",
                                                       "t_max": 2.0})
