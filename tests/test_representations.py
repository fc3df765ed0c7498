"""Representation metrics, feature extraction and stitching against slow, obvious references.

The heart: G_ReLU invariances (relu-procrustes(H, H P D) = 0, relu-cka(H, H P D) = 1, and a ReLU
network with permuted, rescaled hidden units gives the same outputs and distance 0 layer by layer),
CKA against explicit centring matrices, unbiased HSIC against its U-statistic definition, Procrustes
against scipy, and the exact Birkhoff projection against Dykstra's algorithm.
"""

from __future__ import annotations

import copy
import itertools
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from modelsense.errors import ConfigError, DataError
from modelsense.representations import (
    RBFCKA,
    SIMILARITIES,
    AngularShape,
    BirkhoffStitch,
    ChannelBatchNorm,
    LassoStitch,
    LinearCKA,
    LinearStitch,
    Procrustes,
    ReLUCKA,
    ReLUProcrustes,
    RepresentationMetric,
    StitchConfig,
    StitchedModel,
    angular_shape_distance,
    cka_from_grams,
    evaluate_accuracy,
    extract_features,
    hsic_biased,
    hsic_unbiased,
    hungarian_permutation,
    is_doubly_stochastic,
    linear_cka,
    make_metric,
    make_stitching_layer,
    metric_options,
    permutation_matrix,
    procrustes_distance,
    procrustes_nuclear_similarity,
    procrustes_rotation,
    procrustes_similarity,
    project_birkhoff,
    rbf_cka,
    relu_cka,
    relu_kernel,
    relu_module_names,
    relu_procrustes_distance,
    relu_procrustes_matching,
    similarity_matrix,
    sinkhorn_normalize,
    stitch_models,
    stitching_penalty,
    unbiased_cka,
)
from modelsense.representations.metrics import align_channel_shapes
from modelsense.representations.stitching import _param_groups

f64 = torch.float64


def rand(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=f64)
    return x.abs() if positive else x


def random_perm_scale(c, seed, sigma=1.0):
    """A random permutation and lognormal positive scales exp(sigma z)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(c, generator=g), torch.exp(sigma * torch.randn(c, generator=g, dtype=f64))


def act_on_channels(h, perm, scale):
    """h P D: channel j of the result is scale[j] * channel perm[j] of h."""
    shape = (1, -1) + (1,) * (h.ndim - 2)
    return h[:, perm] * scale.reshape(shape)


# ----------------------------------------------------------------------------------------------
# slow, obvious references
# ----------------------------------------------------------------------------------------------


def cka_reference(x, y):
    """HSIC via an explicit centring matrix H = I - 11^T/n: tr(K H L H)."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    n = len(x)
    h = torch.eye(n, dtype=f64) - torch.ones(n, n, dtype=f64) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def hsic1_u_statistic(k, l):
    """HSIC_1 as the U-statistic of Song et al. (2012): the mean over ordered distinct (i,j,q,r) of
    K_ij L_ij + K_ij L_qr - 2 K_ij L_iq."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        count += 1
    return total / count


def hsic1_formula_loops(k, l):
    """Song et al.'s closed form evaluated with explicit loops over entries."""
    n = k.shape[0]
    kt = [[0.0 if a == b else float(k[a, b]) for b in range(n)] for a in range(n)]
    lt = [[0.0 if a == b else float(l[a, b]) for b in range(n)] for a in range(n)]
    tr = sum(kt[a][b] * lt[b][a] for a in range(n) for b in range(n))
    sk = sum(sum(r) for r in kt)
    sl = sum(sum(r) for r in lt)
    cross = sum(sum(kt[a]) * sum(lt[a]) for a in range(n))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def relu_kernel_reference(h, estimator="max"):
    """The original's kernel: per-channel centring and unit norm, then one row at a time."""
    h = h.reshape(h.shape[0], h.shape[1], -1).clone()
    h -= h.mean(dim=(0, 2), keepdim=True)
    h /= h.pow(2).sum(dim=(0, 2), keepdim=True).sqrt()
    n = h.shape[0]
    k = torch.zeros(n, n, dtype=f64)
    for a in range(n):
        for b in range(n):
            if a != b:
                per_channel = (h[a] * h[b]).sum(-1)
                k[a, b] = per_channel.max() if estimator == "max" else per_channel.median()
    return k


def dykstra_birkhoff(y, iters=2000):
    """Dykstra's alternating projections onto {X1 = 1, X^T1 = 1} and {X >= 0}."""
    c = y.shape[0]
    x = y.clone()
    p = torch.zeros_like(y)
    q = torch.zeros_like(y)
    for _ in range(iters):
        z = x + p
        r, s = z.sum(1, keepdim=True), z.sum(0, keepdim=True)
        a = z + (1 - r) / c + (1 - s) / c + (z.sum() - c) / c**2
        p = z - a
        w = a + q
        x = w.clamp_min(0.0)
        q = w - x
    return x


# ----------------------------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape_x, shape_y", [((40, 7), (40, 5)), ((12, 30), (12, 50)), ((20, 3, 2, 2), (20, 6))]
)
def test_linear_cka_matches_centring_matrix_reference(shape_x, shape_y):
    x, y = rand(*shape_x, seed=1), rand(*shape_y, seed=2)
    xf = x.reshape(len(x), -1)
    y = y + 0.3 * (xf @ rand(xf.shape[1], y[0].numel(), seed=3)).reshape(y.shape)  # correlated
    assert linear_cka(x, y) == pytest.approx(cka_reference(x, y), abs=1e-6)
    xf, yf = x.reshape(len(x), -1), y.reshape(len(y), -1)
    assert cka_from_grams(xf @ xf.T, yf @ yf.T) == pytest.approx(cka_reference(x, y), abs=1e-10)
    n = len(x)
    h = torch.eye(n, dtype=f64) - 1.0 / n
    tr = float(torch.trace(xf @ xf.T @ h @ yf @ yf.T @ h)) / (n - 1) ** 2
    assert hsic_biased(xf @ xf.T, (yf @ yf.T).numpy()) == pytest.approx(tr, rel=1e-10)


def test_linear_cka_in_small_blocks_and_from_float32(monkeypatch):
    from modelsense.representations import metrics

    x, y = rand(10, 3, 2, 2, seed=1), rand(10, 7, seed=2) + 0.2 * rand(10, 12, seed=1)[:, :7]
    ref, ref_u = cka_reference(x, y), unbiased_cka(x, y)
    monkeypatch.setattr(metrics, "BLOCK_ENTRIES", 23)  # several column blocks on each path
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-12)
    assert unbiased_cka(x, y) == pytest.approx(ref_u, abs=1e-12)
    assert linear_cka(x.float(), y.float()) == pytest.approx(ref, abs=1e-6)
    narrow_x, narrow_y = rand(30, 6, seed=3), rand(30, 8, seed=4)
    assert linear_cka(narrow_x, narrow_y) == pytest.approx(cka_reference(narrow_x, narrow_y), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed):
    x = rand(50, 8, seed=seed)
    y = x @ rand(8, 6, seed=seed + 10) + 0.3 * rand(50, 6, seed=seed + 20)
    q, _ = torch.linalg.qr(rand(6, 6, seed=seed + 30))
    base, base_u = linear_cka(x, y), unbiased_cka(x, y)
    assert linear_cka(x, 3.7 * y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(0.2 * x, y) == pytest.approx(base, abs=1e-10)
    assert unbiased_cka(x, 3.7 * y @ q) == pytest.approx(base_u, abs=1e-10)
    assert linear_cka(x, x @ torch.linalg.qr(rand(8, 8, seed=seed))[0]) == pytest.approx(1.0, abs=1e-12)
    # not invariant to a non-isotropic rescaling
    assert abs(linear_cka(x, y * torch.linspace(0.1, 3, 6, dtype=f64)) - base) > 1e-3


def test_unbiased_hsic_matches_song_u_statistic_and_loop_formula():
    x, y = rand(7, 3, seed=3), rand(7, 2, seed=4)
    k, l = x @ x.T, torch.exp(-torch.cdist(y, y) ** 2)
    ref = hsic1_u_statistic(k, l)
    assert hsic_unbiased(k, l) == pytest.approx(ref, abs=1e-12)
    assert hsic_unbiased(k, l) == pytest.approx(hsic1_formula_loops(k, l), abs=1e-12)
    # feature-space closed form of linear unbiased CKA against the U-statistic
    ly = y @ y.T
    ref_cka = hsic1_u_statistic(k, ly) / math.sqrt(hsic1_u_statistic(k, k) * hsic1_u_statistic(ly, ly))
    assert unbiased_cka(x, y) == pytest.approx(ref_cka, abs=1e-10)
    assert cka_from_grams(k, ly, debiased=True) == pytest.approx(ref_cka, abs=1e-10)
    # wide features (d > n) take the Gram path
    xw, yw = rand(9, 20, seed=5), rand(9, 15, seed=6)
    kw, lw = xw @ xw.T, yw @ yw.T
    ref_w = hsic1_u_statistic(kw, lw) / math.sqrt(hsic1_u_statistic(kw, kw) * hsic1_u_statistic(lw, lw))
    assert unbiased_cka(xw, yw) == pytest.approx(ref_w, abs=1e-10)


def test_rbf_cka_is_one_for_rigid_motions_and_matches_gram_reference():
    x = rand(30, 4, seed=7)
    q, _ = torch.linalg.qr(rand(4, 4, seed=8))
    assert rbf_cka(x, x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)
    assert unbiased_cka(x, 5 * x @ q, kernel="rbf") == pytest.approx(1.0, abs=1e-10)
    y = torch.tanh(x @ rand(4, 3, seed=9))
    d2x, d2y = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2
    iu = np.triu_indices(30, 1)
    k = torch.exp(-d2x / (2 * float(np.median(d2x.numpy()[iu]))))
    l = torch.exp(-d2y / (2 * float(np.median(d2y.numpy()[iu]))))
    assert rbf_cka(x, y) == pytest.approx(cka_from_grams(k, l), abs=1e-8)


def test_rbf_bandwidth_is_the_median_of_the_pairwise_distances():
    from modelsense.representations.metrics import gram_rbf

    # 4 points on a line: squared distances of the 6 pairs 1, 4, 9, 1, 4, 1 -> median (1 + 4) / 2 = 2.5
    # (torch.median would give the lower middle value 1; with the 4 zero diagonal entries np.median gives 1)
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    d2 = (x - x.T) ** 2
    med = float(np.median(d2.numpy()[np.triu_indices(4, 1)]))
    assert med == 2.5
    for bandwidth in (1.0, 0.5):
        expected = torch.exp(-d2 / (2 * bandwidth**2 * med))
        torch.testing.assert_close(gram_rbf(x, bandwidth), expected, rtol=1e-12, atol=0)
    # odd number of pairs (n = 3: distances 1, 4, 1 -> median 1)
    x3 = x[:3]
    torch.testing.assert_close(gram_rbf(x3), torch.exp(-((x3 - x3.T) ** 2) / 2.0), rtol=1e-12, atol=0)


def test_metrics_accept_numpy_and_torch_and_return_floats():
    x, y = rand(20, 5, seed=1), rand(20, 4, seed=2)
    fns = (linear_cka, unbiased_cka, procrustes_distance, relu_procrustes_distance, relu_cka)
    for fn in fns + (angular_shape_distance,):
        a = fn(x, y)
        b = fn(x.numpy(), y.float().numpy())
        assert isinstance(a, float) and isinstance(b, float)
        assert a == pytest.approx(b, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Procrustes and the angular shape metric
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_procrustes_matches_scipy_orthogonal_procrustes(center):
    x, y = rand(30, 6, seed=1), rand(30, 6, seed=2) + 0.5 * rand(30, 6, seed=1)
    a, b = x.numpy(), y.numpy()
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    r, scale = scipy.linalg.orthogonal_procrustes(a, b)
    assert procrustes_nuclear_similarity(x, y, center) == pytest.approx(scale, abs=1e-10)
    np.testing.assert_allclose(procrustes_rotation(x, y, center).numpy(), r, atol=1e-10)
    assert procrustes_distance(x, y, center) == pytest.approx(np.linalg.norm(a @ r - b) / 2, abs=1e-10)


def test_procrustes_acts_on_channels_of_conv_features():
    h = rand(10, 5, 3, 3, seed=3)
    q, _ = torch.linalg.qr(rand(5, 5, seed=4))
    rotated = torch.einsum("nchw,cd->ndhw", h, q)
    assert procrustes_distance(h, 2.5 * rotated) == pytest.approx(0.0, abs=1e-7)
    rows = h.movedim(1, -1).reshape(-1, 5).numpy()
    r, _ = scipy.linalg.orthogonal_procrustes(rows, rows @ q.numpy())
    np.testing.assert_allclose(procrustes_rotation(h, rotated).numpy(), r, atol=1e-10)


def test_angular_shape_distance_is_a_metric_modulo_similarity_transforms():
    x = rand(25, 4, seed=5)
    q, _ = torch.linalg.qr(rand(4, 4, seed=6))
    assert angular_shape_distance(x, 3 * x @ q + 1.0) == pytest.approx(0.0, abs=1e-6)
    pts = [rand(25, 4, seed=s) for s in range(6)]
    for a, b, c in itertools.combinations(pts, 3):
        dab, dbc = angular_shape_distance(a, b), angular_shape_distance(b, c)
        dac = angular_shape_distance(a, c)
        assert 0 <= dab <= math.pi / 2
        assert dac <= dab + dbc + 1e-10
        assert dab == pytest.approx(angular_shape_distance(b, a), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# G_ReLU metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(60, 9), (30, 7, 3, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_metrics_are_invariant_to_permutation_times_positive_diagonal(shape, seed):
    h = torch.relu(rand(*shape, seed=seed))
    perm, scale = random_perm_scale(shape[1], seed + 100)
    g = act_on_channels(h, perm, scale)
    assert relu_procrustes_distance(h, g) == pytest.approx(0.0, abs=1e-6)
    assert relu_cka(h, g) == pytest.approx(1.0, abs=1e-10)
    assert relu_cka(h, g, estimator="median") == pytest.approx(1.0, abs=1e-10)
    m = relu_procrustes_matching(h, g)
    np.testing.assert_array_equal(m.permutation, perm.numpy())
    np.testing.assert_allclose(m.scale, scale.numpy(), rtol=1e-10)
    np.testing.assert_allclose(m.cosine, 1.0, atol=1e-10)
    assert m.similarity == pytest.approx(1.0, abs=1e-6)
    # a generic rotation is not a symmetry of these metrics, but is one of orthogonal Procrustes
    q, _ = torch.linalg.qr(rand(shape[1], shape[1], seed=seed + 7))
    rot = torch.einsum("nc...,cd->nd...", h, q)
    assert relu_procrustes_distance(h, rot) > 0.05
    assert relu_cka(h, rot) < 0.99
    assert procrustes_distance(h, rot) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_cka_is_low_for_a_rotated_copy_that_linear_cka_calls_identical(seed):
    # the claim of METRIC_NOTES["relu-cka"] (printed by `compare`, in the demo report)
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(
        torch.randn(300, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    )
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    perm, scale = torch.randperm(64, generator=g), torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert 0.25 < relu_cka(x, x @ q) < 0.45
    assert relu_cka(x, x[:, perm] * scale) == pytest.approx(1.0, abs=1e-10)


def test_relu_procrustes_matches_brute_force_over_permutations():
    x, y = torch.relu(rand(15, 4, seed=11)), torch.relu(rand(15, 4, seed=12))
    xn, yn = x / x.norm(dim=0), y / y.norm(dim=0)
    best = min(float((xn[:, list(p)] - yn).pow(2).sum()) for p in itertools.permutations(range(4)))
    assert relu_procrustes_distance(x, y) == pytest.approx(math.sqrt(best / (4 * 4)), abs=1e-12)
    m = relu_procrustes_matching(x, y)
    assert float((xn[:, m.permutation] - yn).pow(2).sum()) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("estimator", ["max", "median"])
def test_relu_kernel_matches_per_pair_reference(estimator):
    h = torch.relu(rand(9, 5, 2, 3, seed=13))
    ref = relu_kernel_reference(h, estimator)
    torch.testing.assert_close(relu_kernel(h, estimator=estimator), ref, atol=1e-12, rtol=0)
    # small blocks give the same kernel
    blocked = relu_kernel(h, estimator=estimator, block_entries=7)
    torch.testing.assert_close(blocked, ref, atol=1e-12, rtol=0)
    k2 = relu_kernel(torch.relu(rand(9, 5, seed=14)))
    assert k2.shape == (9, 9) and torch.all(k2.diagonal() == 0)


def test_channel_and_spatial_shape_alignment():
    h = torch.relu(rand(8, 3, 2, 2, seed=15))
    up = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert relu_procrustes_distance(h, up) == pytest.approx(0.0, abs=1e-7)
    assert procrustes_distance(up, h) == pytest.approx(0.0, abs=1e-7)
    # fewer channels: zero-padded, and the padded channel matches nothing
    wide = torch.relu(rand(8, 5, 2, 2, seed=16))
    a, b = align_channel_shapes(h, wide)
    assert a.shape == b.shape == (8, 5, 2, 2) and torch.all(a[:, 3:] == 0)
    padded = torch.cat([h, torch.zeros(8, 2, 2, 2, dtype=f64)], dim=1)
    expected = relu_procrustes_distance(padded, wide)
    assert relu_procrustes_distance(h, wide) == pytest.approx(expected, abs=1e-12)
    # 2-D against 4-D: a 1 x 1 map
    flat = torch.relu(rand(8, 3, seed=17))
    tiled = flat[:, :, None, None].expand(8, 3, 2, 2)
    assert procrustes_distance(flat, tiled) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(DataError, match="not integer multiples"):
        relu_procrustes_distance(rand(8, 3, 2, 2), rand(8, 3, 3, 3))


def test_similarity_matrix_matches_pairwise_calls():
    fa = {"a": torch.relu(rand(20, 4, seed=1)), "b": torch.relu(rand(20, 3, 2, 2, seed=2))}
    fb = [torch.relu(rand(20, 5, seed=3)), torch.relu(rand(20, 4, 2, 2, seed=4))]
    for name, fn in [("cka", linear_cka), ("unbiased-cka", unbiased_cka), ("relu-cka", relu_cka),
                     ("relu-procrustes", lambda x, y: 1 - relu_procrustes_distance(x, y)),
                     ("procrustes", lambda x, y: 1 - procrustes_distance(x, y)), ("rbf-cka", rbf_cka)]:
        s = similarity_matrix(fa, fb, name)
        ref = np.array([[fn(x, y) for y in fb] for x in fa.values()])
        np.testing.assert_allclose(s, ref, atol=1e-10, err_msg=name)
    d = similarity_matrix(fa, fb, "relu-procrustes", diagonal_only=True)
    assert np.isnan(d[0, 1]) and not np.isnan(d[1, 1])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match=r"expected features of shape \(n, d\)"):
        linear_cka(torch.ones(5), torch.ones(5, 2))
    with pytest.raises(DataError, match="same examples in the same order"):
        linear_cka(rand(5, 2), rand(6, 2))
    with pytest.raises(DataError, match="NaN or inf"):
        relu_cka(torch.full((6, 2), float("nan")), rand(6, 2))
    with pytest.raises(DataError, match="at least 4 examples"):
        unbiased_cka(rand(3, 2), rand(3, 2))
    with pytest.raises(DataError, match="torch.Tensor or numpy.ndarray"):
        procrustes_distance([[1.0, 2.0]], rand(1, 2))
    with pytest.raises(ConfigError, match="unknown similarity 'nope'"):
        similarity_matrix([rand(5, 2)], [rand(5, 2)], "nope")
    with pytest.raises(ConfigError, match="estimator must be one of max, median"):
        relu_cka(rand(5, 2), rand(5, 2), estimator="mean")


# ----------------------------------------------------------------------------------------------
# Metric objects: settings in __init__, fit on training data, score held-out data
# ----------------------------------------------------------------------------------------------


def random_orthogonal(c, seed):
    q, r = torch.linalg.qr(rand(c, c, seed=seed))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def on_flat(x, q):
    """x (n, ...) with each example's flattened vector multiplied by q (d x d)."""
    return (x.reshape(len(x), -1) @ q).reshape(x.shape)


def on_channels(x, q):
    """x (n, C, ...) with the channel vector at every position multiplied by q (C x C)."""
    return torch.einsum("nc...,cd->nd...", x, q)


def per_channel(x, v):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


# Each metric with a member of its invariance group, a function of the features x (n, ...) applied
# identically to the training and the held-out features (the same draw for both).
def group_transform(kind, shape, seed):
    c, d = shape[0], int(np.prod(shape))
    scale = 0.3 + 2.0 * float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
    if kind == "flat-similarity":  # orthogonal map of the flattened vector, isotropic scale, shift
        q, t = random_orthogonal(d, seed + 1), rand(d, seed=seed + 2)
        return lambda x: scale * on_flat(x, q) + t.reshape(shape)
    if kind == "channel-similarity":  # orthogonal map of the channels, isotropic scale, shift
        q, t = random_orthogonal(c, seed + 1), rand(c, seed=seed + 2)
        return lambda x: scale * on_channels(x, q) + per_channel(x, t)
    if kind == "channel-rotation":  # orthogonal map of the channels and isotropic scale, no shift
        q = random_orthogonal(c, seed + 1)
        return lambda x: scale * on_channels(x, q)
    if kind == "permutation-scale":  # G_ReLU: channel permutation x positive diagonal
        perm, s = random_perm_scale(c, seed + 1)
        return lambda x: act_on_channels(x, perm, s)
    raise AssertionError(kind)


GROUP_CASES = [
    (LinearCKA(), "flat-similarity"),
    (LinearCKA(debiased=True), "flat-similarity"),
    (RBFCKA(), "flat-similarity"),
    (RBFCKA(bandwidth=0.6, debiased=True), "flat-similarity"),
    (ReLUCKA(), "permutation-scale"),
    (ReLUCKA(centered=False, estimator="median"), "permutation-scale"),
    (Procrustes(), "channel-rotation"),
    (Procrustes(center=True), "channel-similarity"),
    (AngularShape(), "channel-similarity"),
    (AngularShape(center=False), "channel-rotation"),
    (ReLUProcrustes(), "permutation-scale"),
]
SIZES = [(40, 25, (6,)), (30, 12, (4, 3, 3)), (150, 60, (16,))]  # n_train, n_test, per-example shape


@pytest.mark.parametrize("metric, kind", GROUP_CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("n_train, n_test, shape", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_data_transformed_by_the_invariance_group_scores_one(metric, kind, n_train, n_test, shape, seed):
    x = torch.relu(rand(n_train + n_test, *shape, seed=seed))
    g = group_transform(kind, shape, seed + 50)
    x_train, x_test = x[:n_train], x[n_train:]
    m = type(metric)(**metric.settings())
    assert m.fit(x_train, g(x_train)) is m
    assert m.score(x_test, g(x_test)) == pytest.approx(1.0, abs=1e-6)
    assert m.score(x_train, g(x_train)) == pytest.approx(1.0, abs=1e-6)
    if hasattr(m, "distance"):
        assert m.distance(x_test, g(x_test)) == pytest.approx(0.0, abs=1e-6)


# A transformation outside the metric's invariance group (applied to training and held-out data)
OUTSIDE_CASES = [
    (LinearCKA(), "stretch"),
    (LinearCKA(debiased=True), "stretch"),
    (RBFCKA(), "stretch"),
    (ReLUCKA(), "channel-rotation"),
    (ReLUCKA(estimator="median"), "channel-rotation"),
    (Procrustes(), "stretch"),
    (Procrustes(), "shift"),  # no centring: a translation is not a symmetry
    (Procrustes(center=True), "stretch"),
    (AngularShape(), "stretch"),
    (ReLUProcrustes(), "channel-rotation"),
]


@pytest.mark.parametrize("metric, kind", OUTSIDE_CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("n_train, n_test, shape", SIZES)
def test_a_transformation_outside_the_group_scores_below_one(metric, kind, n_train, n_test, shape):
    x = torch.relu(rand(n_train + n_test, *shape, seed=3))
    c = shape[0]
    if kind == "stretch":  # a non-isotropic scaling of the channels
        stretch = torch.linspace(0.1, 3.0, c, dtype=f64)
        def g(h):
            return h * per_channel(h, stretch)
    elif kind == "shift":
        def g(h):
            return h + 2.0
    else:
        q = random_orthogonal(c, 4)
        def g(h):
            return on_channels(h, q)
    m = type(metric)(**metric.settings()).fit(x[:n_train], g(x[:n_train]))
    assert m.score(x[n_train:], g(x[n_train:])) < 1 - 1e-3
    assert m.fit_score(x[:n_train], g(x[:n_train])) < 1 - 1e-3


def test_learned_metrics_are_fitted_on_training_data_not_on_the_scored_data():
    # fitted on one rotation, scored on held-out data rotated by another: < 1 (while a fit on the
    # held-out pair itself gives 1)
    x = rand(60, 5, seed=1)
    q1, q2 = random_orthogonal(5, 2), random_orthogonal(5, 3)
    m = Procrustes().fit(x[:40], x[:40] @ q1)
    assert m.score(x[40:], x[40:] @ q2) < 0.9
    assert Procrustes().fit_score(x[40:], x[40:] @ q2) == pytest.approx(1.0, abs=1e-6)
    h = torch.relu(rand(60, 5, seed=4))
    perm1, s1 = random_perm_scale(5, 5)
    perm2, s2 = random_perm_scale(5, 6)
    assert not torch.equal(perm1, perm2)
    r = ReLUProcrustes().fit(h[:40], act_on_channels(h[:40], perm1, s1))
    assert r.score(h[40:], act_on_channels(h[40:], perm2, s2)) < 0.9


def test_procrustes_on_held_out_data_matches_the_closed_form_by_hand():
    q = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=f64)  # rotation by 90 degrees
    # no centring: training pair y = x Q, so the fitted R is Q
    x_train = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=f64)
    y_train = torch.tensor([[0.0, 1.0], [-2.0, 0.0]], dtype=f64)
    x_test = torch.eye(2, dtype=f64)  # A = I / sqrt(2), A R = Q / sqrt(2)
    y_test = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=f64)  # B = y_test / sqrt(3)
    # <A R, B> = <Q, y_test> / sqrt(6) = 1 / sqrt(6)
    m = Procrustes().fit(x_train, y_train)
    torch.testing.assert_close(m.rotation_, q, atol=1e-10, rtol=0)
    assert m.score(x_test, y_test) == pytest.approx(1 - math.sqrt(2 - 2 / math.sqrt(6)) / 2, abs=1e-10)
    assert m.distance(x_test, y_test) == pytest.approx(math.sqrt(2 - 2 / math.sqrt(6)) / 2, abs=1e-10)
    a = AngularShape(center=False).fit(x_train, y_train)
    assert a.score(x_test, y_test) == pytest.approx(1 / math.sqrt(6), abs=1e-10)
    assert a.distance(x_test, y_test) == pytest.approx(math.acos(1 / math.sqrt(6)), abs=1e-10)

    # centring: the training means (1, 1) and (5, -3) are learned and subtracted from held-out data
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -2.0]], dtype=f64)  # centred columns
    x_train, y_train = z + torch.tensor([1.0, 1.0], dtype=f64), z @ q + torch.tensor([5.0, -3.0], dtype=f64)
    x_test = torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]], dtype=f64)  # A = [[0, 0], [1, 0], [0, 1]] / sqrt(2)
    y_test = torch.tensor([[5.0, -3.0], [6.0, -2.0], [5.0, -2.0]], dtype=f64)  # B = [[0, 0], [1, 1], [0, 1]] / sqrt(3)
    # A R = [[0, 0], [0, 1], [-1, 0]] / sqrt(2): cos(theta) = <A R, B> = 1 / sqrt(6) (the held-out data's own
    # means would give 1/2), and the Procrustes distance is sin(theta / 2) = sqrt((1 - cos(theta)) / 2)
    m = Procrustes(center=True).fit(x_train, y_train)
    torch.testing.assert_close(m.rotation_, q, atol=1e-10, rtol=0)
    torch.testing.assert_close(m.mean_x_, torch.tensor([1.0, 1.0], dtype=f64), atol=1e-10, rtol=0)
    torch.testing.assert_close(m.mean_y_, torch.tensor([5.0, -3.0], dtype=f64), atol=1e-10, rtol=0)
    theta = math.acos(1 / math.sqrt(6))
    assert m.score(x_test, y_test) == pytest.approx(1 - math.sin(theta / 2), abs=1e-10)
    assert m.distance(x_test, y_test) == pytest.approx(math.sqrt((1 - 1 / math.sqrt(6)) / 2), abs=1e-10)
    a = AngularShape().fit(x_train, y_train)
    assert a.score(x_test, y_test) == pytest.approx(1 / math.sqrt(6), abs=1e-10)
    assert a.distance(x_test, y_test) == pytest.approx(theta, abs=1e-10)


def test_relu_procrustes_on_held_out_data_matches_the_closed_form_by_hand():
    # training pair y = x P D: channel 0 of y is 2 * channel 1 of x, channel 1 of y is 3 * channel 0
    x_train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=f64)  # channel norms sqrt(2), sqrt(2)
    y_train = torch.tensor([[0.0, 3.0], [2.0, 0.0], [2.0, 3.0]], dtype=f64)  # 2 sqrt(2), 3 sqrt(2)
    m = ReLUProcrustes().fit(x_train, y_train)
    np.testing.assert_array_equal(m.matching_.permutation, [1, 0])
    np.testing.assert_allclose(m.matching_.scale, [2.0, 3.0], rtol=1e-12)
    assert m.fit_score(x_train, y_train) == pytest.approx(1.0, abs=1e-6)  # sqrt of a rounding error
    # held out: A = x_test[:, perm] / (sqrt(2), sqrt(2)) -> norm^2 1 -> rescaled to norm^2 2 (two live
    # channels): A = [[0, 1], [1, 0]]. B = y_test / (2 sqrt(2), 3 sqrt(2)) -> norm^2 13/36 -> rescaled:
    # rows (3, 2) / sqrt(13). ||A - B||^2 = 2 + 2 - 2 (2 + 3) / sqrt(13); d = ||A - B|| / (2 sqrt(2)).
    x_test = torch.eye(2, dtype=f64)
    y_test = torch.ones(2, 2, dtype=f64)
    d = math.sqrt(4 - 10 / math.sqrt(13)) / (2 * math.sqrt(2))
    assert m.distance(x_test, y_test) == pytest.approx(d, abs=1e-10)
    assert m.score(x_test, y_test) == pytest.approx(1 - d, abs=1e-10)


FUNCTIONAL_FORMS = [
    (LinearCKA(), linear_cka),
    (LinearCKA(debiased=True), unbiased_cka),
    (RBFCKA(bandwidth=0.8), lambda x, y: rbf_cka(x, y, bandwidth=0.8)),
    (RBFCKA(debiased=True), lambda x, y: unbiased_cka(x, y, kernel="rbf")),
    (ReLUCKA(estimator="median"), lambda x, y: relu_cka(x, y, estimator="median")),
    (Procrustes(), lambda x, y: 1 - procrustes_distance(x, y)),
    (Procrustes(center=True), lambda x, y: procrustes_similarity(x, y, center=True)),
    (AngularShape(), lambda x, y: math.cos(angular_shape_distance(x, y))),
    (AngularShape(center=False), procrustes_nuclear_similarity),
    (ReLUProcrustes(), lambda x, y: 1 - relu_procrustes_distance(x, y)),
]


@pytest.mark.parametrize(
    "metric, fn", FUNCTIONAL_FORMS, ids=lambda v: repr(v) if isinstance(v, RepresentationMetric) else ""
)
@pytest.mark.parametrize(
    "shape_x, shape_y", [((30, 6), (30, 4)), ((20, 3, 2, 2), (20, 5, 2, 2)), ((12, 8), (12, 2, 3, 3))]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_score_on_the_fit_data_equals_the_functional_form(metric, fn, shape_x, shape_y, seed):
    x = torch.relu(rand(*shape_x, seed=seed))
    y = torch.relu(rand(*shape_y, seed=seed + 10))
    if shape_x == shape_y or shape_x[1:] == shape_y[1:]:
        y = y + 0.5 * x
    m = type(metric)(**metric.settings())
    fitted = m.fit(x, y).score(x, y)  # the held-out path, on the fit's data
    assert isinstance(fitted, float)
    assert fitted == pytest.approx(fn(x, y), abs=1e-9)
    assert m.fit_score(x, y) == pytest.approx(fitted, abs=1e-9)
    # numpy float32 inputs give the same number to float32 precision
    assert m.fit(x.numpy(), y.float().numpy()).score(x.float().numpy(), y.numpy()) == pytest.approx(fitted, abs=1e-5)


def test_fitted_state_is_the_functional_forms_alignment():
    x = rand(30, 6, seed=1)
    y = rand(30, 6, seed=2) + 0.5 * x
    for center in (False, True):
        m = Procrustes(center=center).fit(x, y)
        torch.testing.assert_close(m.rotation_, procrustes_rotation(x, y, center), atol=1e-12, rtol=0)
        np.testing.assert_allclose(m.mean_x_.numpy(), x.numpy().mean(0) if center else 0.0, atol=1e-12)
    h, g = torch.relu(rand(25, 5, 2, 2, seed=3)), torch.relu(rand(25, 5, 2, 2, seed=4))
    r = ReLUProcrustes().fit(h, g)
    ref = relu_procrustes_matching(h, g)
    np.testing.assert_array_equal(r.matching_.permutation, ref.permutation)
    np.testing.assert_allclose(r.matching_.scale, ref.scale, rtol=1e-12)
    def rows(t):
        return t.movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(r.channel_norms_x_, rows(h).norm(dim=0), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LinearCKA(debiased="yes"), "LinearCKA: debiased must be True or False, received 'yes'"),
        (lambda: LinearCKA(debiased=1), "debiased must be True or False, received 1"),
        (lambda: RBFCKA(bandwidth=0.0), "RBFCKA: bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(bandwidth=-1), "bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(bandwidth=float("nan")), "bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(bandwidth=float("inf")), "bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(bandwidth=True), "bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(bandwidth="1"), "bandwidth must be a finite number > 0"),
        (lambda: RBFCKA(debiased=None), "RBFCKA: debiased must be True or False"),
        (lambda: ReLUCKA(estimator="mean"), "ReLUCKA: estimator must be one of max, median, received 'mean'"),
        (lambda: ReLUCKA(centered="no"), "ReLUCKA: centered must be True or False"),
        (lambda: Procrustes(center="true"), "Procrustes: center must be True or False"),
        (lambda: AngularShape(center=2), "AngularShape: center must be True or False"),
    ],
)
def test_bad_settings_are_refused_in_init(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(
    "name, options, message",
    [
        (
            "cka",
            {"bandwidth": 2.0},
            "similarity 'cka' does not take option 'bandwidth' ('bandwidth' is an option of rbf-cka); it takes no "
            "options",
        ),
        ("unbiased-cka", {"debiased": False}, "similarity 'unbiased-cka' does not take option 'debiased'"),
        ("procrustes", {"centered": True}, "'centered' is an option of relu-cka); it takes center"),
        (
            "relu-cka",
            {"center": True, "bandwidth": 1.0},
            (
                "does not take options 'center', 'bandwidth' ('center' is an option of procrustes, angular-shape; "
                "'bandwidth' is an "
                "option of rbf-cka); it takes centered, estimator"
            ),
        ),
        ("rbf-cka", {"estimator": "max"}, "similarity 'rbf-cka' does not take option 'estimator'"),
        ("relu-procrustes", {"threshold": 1}, "'threshold' is an option of no similarity); it takes no options"),
        ("rbf-cka", {"bandwidth": -1.0}, "similarity 'rbf-cka': RBFCKA: bandwidth must be a finite number > 0"),
        ("nope", {}, "unknown similarity 'nope'"),
    ],
)
def test_make_metric_refuses_options_the_metric_does_not_take(name, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_metric(name, **options)
    if name != "nope":
        with pytest.raises(ConfigError, match=re.escape(message)):
            similarity_matrix([rand(6, 2)], [rand(6, 2)], name, **options)


def test_make_metric_builds_each_similarity_with_its_options():
    assert repr(make_metric("cka")) == "LinearCKA(debiased=False)"
    assert repr(make_metric("unbiased-cka")) == "LinearCKA(debiased=True)"
    assert repr(make_metric("rbf-cka", bandwidth=2, debiased=True)) == "RBFCKA(bandwidth=2.0, debiased=True)"
    assert repr(make_metric("relu-cka", estimator="median")) == "ReLUCKA(centered=True, estimator='median')"
    assert repr(make_metric("procrustes", center=True)) == "Procrustes(center=True)"
    assert repr(make_metric("relu-procrustes")) == "ReLUProcrustes()"
    assert repr(make_metric("angular-shape")) == "AngularShape(center=True)"
    assert {name: metric_options(name) for name in SIMILARITIES} == {
        "cka": (), "unbiased-cka": (), "rbf-cka": ("bandwidth", "debiased"), "procrustes": ("center",),
        "angular-shape": ("center",), "relu-procrustes": (), "relu-cka": ("centered", "estimator"),
    }


@pytest.mark.parametrize("metric", [Procrustes(), AngularShape(), ReLUProcrustes()], ids=repr)
def test_learned_metrics_refuse_to_score_before_fit_and_features_of_other_layers(metric):
    x, y = rand(10, 4, seed=1), rand(10, 3, seed=2)
    m = type(metric)()
    for method in (m.score, m.distance):
        with pytest.raises(ConfigError, match=f"{type(m).__name__} is not fitted; call .fit"):
            method(x, y)
    m.fit(x, y)
    with pytest.raises(DataError, match=re.escape("fitted on features of per-example shapes (4,) and (3,), "
                                                  "got (5,) and (3,)")):
        m.score(rand(7, 5, seed=3), rand(7, 3, seed=4))
    with pytest.raises(DataError, match="same examples in the same order"):
        m.score(rand(7, 4, seed=3), rand(8, 3, seed=4))
    assert m.learns and not LinearCKA.learns


@pytest.mark.parametrize("metric", [LinearCKA(), RBFCKA(), ReLUCKA()], ids=repr)
def test_cka_metrics_learn_nothing_and_score_unfitted(metric):
    x, y = rand(12, 4, seed=1), rand(12, 3, seed=2)
    m = type(metric)(**metric.settings())
    unfitted = m.score(x, y)
    assert m.fit(rand(20, 4, seed=5), rand(20, 3, seed=6)).score(x, y) == unfitted
    assert vars(m) == metric.settings()  # no learned state
    with pytest.raises(DataError, match=f"at least {m.min_examples} examples"):
        m.fit(rand(m.min_examples - 1, 4), rand(m.min_examples - 1, 3))


def test_similarity_matrix_with_options_and_metric_objects():
    fa = [torch.relu(rand(20, 4, seed=1)), torch.relu(rand(20, 3, 2, 2, seed=2))]
    fb = [torch.relu(rand(20, 5, seed=3)), torch.relu(rand(20, 4, 2, 2, seed=4))]
    s = similarity_matrix(fa, fb, "rbf-cka", bandwidth=0.5, debiased=True)
    ref = np.array([[RBFCKA(bandwidth=0.5, debiased=True).score(x, y) for y in fb] for x in fa])
    np.testing.assert_allclose(s, ref, atol=1e-12)
    assert np.abs(s - similarity_matrix(fa, fb, "rbf-cka")).max() > 1e-3  # the options are used
    np.testing.assert_allclose(similarity_matrix(fa, fb, "procrustes", center=True),
                               [[procrustes_similarity(x, y, center=True) for y in fb] for x in fa], atol=1e-12)
    shape = AngularShape()
    s = similarity_matrix(fa, fb, shape)
    np.testing.assert_allclose(s, [[AngularShape().fit_score(x, y) for y in fb] for x in fa], atol=1e-12)
    assert not hasattr(shape, "rotation_")  # each pair is fitted on a fresh copy
    with pytest.raises(ConfigError, match="set the options on the object"):
        similarity_matrix(fa, fb, shape, center=False)


# ----------------------------------------------------------------------------------------------
# ReLU networks and their symmetries; feature extraction
# ----------------------------------------------------------------------------------------------


def permute_hidden_units(
    model: nn.Sequential, seed: int, sigma: float = 1.0
) -> tuple[nn.Sequential, list[torch.Tensor]]:
    """A copy of a Linear/Conv2d-ReLU stack whose hidden units are permuted and positively rescaled
    (unit j of each hidden layer = scale[j] * old unit perm[j]); the function is unchanged."""
    new = copy.deepcopy(model)
    layers = [m for m in new if isinstance(m, (nn.Linear, nn.Conv2d))]
    perms = []
    prev = None
    with torch.no_grad():
        for i, layer in enumerate(layers):
            w = layer.weight
            if prev is not None:  # undo the previous layer's P D on the input side
                p_prev, s_prev = prev
                if w.shape[1] != len(p_prev):  # flatten after a conv: channels x positions
                    w3 = w.reshape(w.shape[0], len(p_prev), -1)
                    w3.copy_(w3[:, p_prev] / s_prev[None, :, None])
                else:
                    w.copy_(w[:, p_prev] / s_prev.reshape(1, -1, *([1] * (w.ndim - 2))))
            if i < len(layers) - 1:
                p, s = random_perm_scale(w.shape[0], seed + i, sigma)
                s = s.to(w.dtype)
                w.copy_(w[p] * s.reshape(-1, *([1] * (w.ndim - 1))))
                layer.bias.copy_(layer.bias[p] * s)
                perms.append(p)
                prev = (p, s)
    return new, perms


def test_relu_network_symmetry_gives_same_outputs_and_zero_distance_per_layer():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).double()
    cnn = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    ).double()
    for model, x in ((mlp, rand(40, 6, seed=1)), (cnn, rand(30, 2, 6, 6, seed=2))):
        twin, perms = permute_hidden_units(model, seed=5)
        torch.testing.assert_close(twin(x), model(x), atol=1e-10, rtol=0)
        fa, fb = extract_features(model, x, dtype=f64), extract_features(twin, x, dtype=f64)
        assert list(fa) == relu_module_names(model) == ["1", "3"]
        for name, p in zip(fa, perms):
            assert relu_procrustes_distance(fa[name], fb[name]) == pytest.approx(0.0, abs=1e-6)
            assert relu_cka(fa[name], fb[name]) == pytest.approx(1.0, abs=1e-10)
            matching = relu_procrustes_matching(fa[name], fb[name])
            np.testing.assert_array_equal(matching.permutation, p.numpy())
        diagonal = np.diag(similarity_matrix(fa, fb, "relu-procrustes", diagonal_only=True))
        np.testing.assert_allclose(diagonal, 1.0, atol=1e-6)


class Branchy(nn.Module):
    """Not a Sequential: a shared ReLU called twice, an in-place ReLU, a custom forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h2 = self.act(self.fc2(h)) + h
        z = self.inplace(h2 - 1.0)
        z.mul_(2.0)  # must not change what was collected
        return self.head(z)


def test_extract_features_batches_reused_modules_and_modes():
    torch.manual_seed(0)
    m = Branchy().train()
    x = torch.randn(23, 4)
    feats = extract_features(m, x, batch_size=5)
    assert list(feats) == ["act#0", "act#1", "inplace"]
    assert m.training  # mode restored
    with torch.no_grad():
        h = torch.relu(m.fc1(x))
        h2 = torch.relu(m.fc2(h)) + h
    torch.testing.assert_close(feats["act#0"], h)
    torch.testing.assert_close(feats["inplace"], torch.relu(h2 - 1.0))
    whole = extract_features(m, x.numpy(), names=["fc2", "inplace"], batch_size=100)
    torch.testing.assert_close(whole["inplace"], feats["inplace"])
    assert whole["fc2"].shape == (23, 8)
    with pytest.raises(ConfigError, match="no module named \\['nope'\\]"):
        extract_features(m, x, names=["nope"])
    with pytest.raises(ConfigError, match="no nn.ReLU submodule"):
        extract_features(nn.Linear(4, 2), x)


# ----------------------------------------------------------------------------------------------
# Birkhoff polytope
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_birkhoff_projection_matches_dykstra_and_is_idempotent(seed):
    y = 0.7 * rand(5, 5, seed=seed)
    x = project_birkhoff(y)
    assert is_doubly_stochastic(x, atol=1e-9)
    torch.testing.assert_close(x, dykstra_birkhoff(y), atol=1e-9, rtol=0)
    torch.testing.assert_close(project_birkhoff(x), x, atol=1e-10, rtol=0)
    # the nearest point of the polytope is at least as close as every vertex
    dist = float((x - y).norm())
    for p in itertools.permutations(range(5)):
        assert dist <= float((permutation_matrix(np.array(p), f64) - y).norm()) + 1e-12
    # vertices and the barycentre are fixed points
    p = permutation_matrix(np.array([2, 0, 4, 1, 3]), f64)
    torch.testing.assert_close(project_birkhoff(p), p, atol=0, rtol=0)
    centre = torch.full((5, 5), 0.2, dtype=f64)
    torch.testing.assert_close(project_birkhoff(centre), centre)


def test_exact_birkhoff_projection_larger_and_warm_started():
    y = 3 * rand(40, 40, seed=4)
    x, duals = project_birkhoff(y, return_duals=True)
    assert is_doubly_stochastic(x, atol=1e-9)
    torch.testing.assert_close(project_birkhoff(x), x, atol=1e-9, rtol=0)
    y2 = y + 0.01 * rand(40, 40, seed=5)
    torch.testing.assert_close(project_birkhoff(y2, duals=duals), project_birkhoff(y2), atol=1e-9, rtol=0)
    with pytest.raises(DataError, match="square"):
        project_birkhoff(torch.ones(2, 3))


def test_sinkhorn_normalisation_rows_first_and_zero_lines_untouched():
    w = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]])
    one = sinkhorn_normalize(w, 1)
    torch.testing.assert_close(one[0], torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(one[1], torch.zeros(3))
    s = sinkhorn_normalize(torch.rand(6, 6, generator=torch.Generator().manual_seed(0)), 200)
    assert is_doubly_stochastic(s, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Stitching layers and the stitched model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "birkhoff", "permutation", "lowrank", "lasso"])
def test_stitching_layers_map_channels_of_dense_and_conv_features(kind):
    layer = make_stitching_layer(StitchConfig(kind=kind, rank=2), 4)
    for shape in [(3, 4), (3, 4, 5, 5), (3, 4, 7)]:
        x = torch.randn(*shape)
        for training in (True, False):
            layer.train(training)
            w = layer.weight_matrix()
            ref = torch.einsum("jk,nk...->nj...", w, x)
            torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="expects 4 input channels"):
        layer(torch.randn(3, 5))


def test_permutation_layer_rounds_with_hungarian_at_eval_and_lasso_prunes():
    layer = BirkhoffStitch(4, round_at_eval=True)
    target = np.array([2, 0, 3, 1])
    with torch.no_grad():
        layer.perm.copy_(0.7 * permutation_matrix(target) + 0.3 / 4)
        layer.scales.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(layer.permutation(), target)
    layer.eval()
    expected = permutation_matrix(target) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :]
    torch.testing.assert_close(layer.weight_matrix(), expected)
    layer.train()
    torch.testing.assert_close(layer.weight_matrix(), layer.perm * layer.scales[None, :])
    assert hungarian_permutation(layer.perm).tolist() == target.tolist()

    lasso = LassoStitch(3, 3, multiplier=0.5)
    with torch.no_grad():
        lasso.weight.copy_(torch.tensor([[1.0, 5e-5, 0.0], [-2e-3, 1.0, 0.0], [0.0, 0.0, -1.0]]))
    assert float(lasso.penalty().detach()) == pytest.approx(0.5 * (3 + 5e-5 + 2e-3))
    assert lasso.sparsity() == pytest.approx(5 / 9)
    lasso.eval()
    pruned = lasso.weight_matrix().detach()
    assert float(pruned[0, 1]) == 0.0 and float(pruned[1, 0]) == pytest.approx(-2e-3)


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.mid = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.act(self.mid(self.body(x))))


def test_stitched_model_identity_stitch_reproduces_the_model_in_both_modes():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 3)
    )
    x = torch.randn(10, 5)
    for model, layer in ((seq, "2.1"), (seq, "1"), (NotSequential(), "body.2"), (NotSequential(), "act")):
        model.eval()
        ident = LinearStitch(6, 6)
        with torch.no_grad():
            ident.weight.copy_(torch.eye(6))
        auto = StitchedModel(model, model, ident, layer)
        hooks = StitchedModel(model, model, ident, layer, mode="hooks")
        assert auto.mode == ("sequential" if model is seq else "hooks") and hooks.mode == "hooks"
        with torch.no_grad():
            torch.testing.assert_close(auto(x), model(x))
            torch.testing.assert_close(hooks(x), model(x))
    with pytest.raises(ConfigError, match="no module named 'zzz'"):
        StitchedModel(seq, seq, LinearStitch(6, 6), "zzz")
    with pytest.raises(ConfigError, match="plain nn.Sequential"):
        StitchedModel(NotSequential(), NotSequential(), LinearStitch(6, 6), "act", mode="sequential")


def test_stitch_training_changes_only_the_layer_and_keeps_frozen_nets_in_eval_mode():
    torch.manual_seed(0)
    a, b = NotSequential(), NotSequential()
    for m in (a, b):  # give the batch norms non-trivial running statistics
        m.body[1].running_mean.uniform_(-1, 1)
    def state():
        both = list(a.state_dict().items()) + [("b." + k, v) for k, v in b.state_dict().items()]
        return {k: v.clone() for k, v in both}

    before = state()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    for kind in ("linear", "permutation", "lowrank", "lasso"):
        cfg = StitchConfig(kind=kind, epochs=2, batch_size=16, rank=2, lr=0.05)
        stitched, hist = stitch_models(a, b, "body.2", x, y, cfg)
        assert len(hist.loss) == 2 and all(np.isfinite(hist.loss))
        assert not a.training and not b.training and not stitched.training
        stitched.train()
        assert not a.training and not b.training and stitched.stitch.training
        assert all(not p.requires_grad for p in list(a.parameters()) + list(b.parameters()))
        after = state()
        for k in before:
            torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    assert stitching_penalty(0.9, 0.8, 0.6) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="unknown stitching kind"):
        StitchConfig(kind="wreath")
    with pytest.raises(ConfigError, match="cuda:999"):
        StitchConfig(device="cuda:999")


def test_birkhoff_training_keeps_w_doubly_stochastic_under_both_projections():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    for projection in ("sinkhorn", "exact"):
        cfg = StitchConfig(kind="birkhoff", projection=projection, epochs=2, batch_size=16, lr=0.1)
        stitched, hist = stitch_models(a, copy.deepcopy(a), "1", x, y, cfg)
        w = stitched.stitch.perm.detach()
        assert is_doubly_stochastic(w, atol=1e-3 if projection == "sinkhorn" else 1e-5)
        assert hist.phase == ["permutation", "scales"]
        assert torch.all(stitched.stitch.scales >= 0)


@pytest.mark.parametrize("shape, reference", [((12, 4), nn.BatchNorm1d), ((12, 4, 5), nn.BatchNorm1d),
                                              ((12, 4, 3, 3), nn.BatchNorm2d)])
@pytest.mark.parametrize("affine", [False, True])
def test_channel_batch_norm_equals_torch_batch_norm(shape, reference, affine):
    torch.manual_seed(0)
    ours, ref = ChannelBatchNorm(4, affine=affine), reference(4, affine=affine)
    if affine:
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.arange(1.0, 5.0))
                m.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    for step in range(3):  # training mode: batch statistics, running statistics updated alike
        x = torch.randn(*shape) * 3 + step
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(DataError, match="batch norm of 4 channels got activations of shape"):
        ours(torch.randn(3, 5))


def test_stitching_layer_between_batch_norms():
    torch.manual_seed(0)
    cfg = StitchConfig(kind="linear", batch_norm="both")
    layer = make_stitching_layer(cfg, 3, 2).eval()
    with torch.no_grad():
        layer.norm_before.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        layer.norm_before.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        layer.norm_after.running_mean.copy_(torch.tensor([0.2, 0.3]))
    x = torch.randn(7, 3, 2, 2)
    eps = 1e-5
    z = (x - layer.norm_before.running_mean[:, None, None]) / torch.sqrt(layer.norm_before.running_var + eps)[
        :, None, None
    ]
    w = torch.einsum("jk,nkhw->njhw", layer.weight, z)
    expected = (w - layer.norm_after.running_mean[:, None, None]) / torch.sqrt(1 + torch.tensor(eps))
    torch.testing.assert_close(layer(x), expected)
    assert layer.norm_before.weight is None  # affine only with a bias, as the original
    assert make_stitching_layer(StitchConfig(kind="permutation", batch_norm="after"), 3).norm_before is None
    assert not make_stitching_layer(StitchConfig(kind="lowrank", rank=1), 3).has_batch_norm
    for bad, message in (({"batch_norm": "middle"}, "unknown --stitch-bn 'middle'"),
                         ({"schedule": "cosine"}, "unknown --stitch-schedule 'cosine'"),
                         ({"batch_norm": "before", "init": "match"}, "cannot be combined with --stitch-bn")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            StitchConfig(**bad)


def test_stitch_training_with_batch_norm_skips_a_last_batch_of_one_and_evaluates_with_running_stats():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(33, 5), torch.randint(0, 3, (33,))  # batches of 16, 16, 1
    for kind in ("linear", "permutation"):
        stitched, hist = stitch_models(a, copy.deepcopy(a), "1", x, y, StitchConfig(kind=kind, batch_norm="both",
                                                                                      epochs=2, batch_size=16, lr=0.05))
        assert all(np.isfinite(hist.loss))
        bn = stitched.stitch.norm_before
        assert not torch.allclose(bn.running_mean, torch.zeros(6))  # updated while training
        stitched.eval()
        before = stitched(x[:4])
        torch.testing.assert_close(stitched(x[:1]), before[:1])  # eval: running statistics, per example
        groups = _param_groups(stitched.stitch, 1e-4)  # every parameter trains (the norms without weight decay)
        assert sum(len(g["params"]) for g in groups) == len(list(stitched.stitch.parameters()))


@pytest.mark.parametrize("kind, warmup, schedule, expected", [
    ("permutation", True, "step", ([1, 1 / 2, 1 / 4, 1 / 8], [1 / 16, 1 / 32, 1 / 64, 1 / 128])),
    ("permutation", True, "constant", ([1] * 4, [1] * 4)),
    ("permutation", False, "step", ([1, 1, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 8, 1 / 8], [])),
    ("linear", True, "step", ([1, 1, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 8, 1 / 8], [])),
])
def test_stitching_schedule_and_permutation_warmup_follow_the_original(kind, warmup, schedule, expected):
    """StepLR(max(1, epochs of the phase // 4), 0.5) per phase; the scales phase of the warm-up at lr / 16."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    cfg = StitchConfig(kind=kind, epochs=8, batch_size=16, lr=0.04, perm_warmup=warmup, schedule=schedule)
    _, hist = stitch_models(a, copy.deepcopy(a), "1", x, y, cfg)
    first, second = expected
    np.testing.assert_allclose(hist.lr, [0.04 * f for f in first + second], rtol=1e-12)
    names = ["permutation"] * 4 + ["scales"] * 4 if second else ["all"] * 8
    assert hist.phase == names


@pytest.fixture(scope="module")
def digits_model():
    """A small ReLU MLP trained on sklearn digits (first 1400 examples), and the data."""
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs / 16.0, dtype=torch.float32)
    y = torch.tensor(ys)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    return model.eval(), x, y


def test_permutation_stitching_recovers_the_permutation_and_full_accuracy(digits_model):
    """Matched init (G_ReLU-Procrustes on the activations) + a little projected-gradient training."""
    model, x, y = digits_model
    twin, perms = permute_hidden_units(model, seed=3, sigma=0.3)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    clean = evaluate_accuracy(model, xte, yte)
    assert clean > 0.85 and evaluate_accuracy(twin, xte, yte) == clean
    alive = (extract_features(twin, xtr)["1"] > 0).any(0).numpy()  # dead units: any match is as good
    cfg = StitchConfig(kind="permutation", init="match", epochs=2, lr=1e-3)
    stitched, _ = stitch_models(model, twin, "1", xtr, ytr, cfg)
    np.testing.assert_array_equal(stitched.stitch.permutation()[alive], perms[0].numpy()[alive])
    assert evaluate_accuracy(stitched, xte, yte) == pytest.approx(clean, abs=1e-9)


@pytest.mark.slow
def test_permutation_stitching_by_projected_gradient_from_the_original_init(digits_model):
    """The original's procedure (uniform + Sinkhorn init, -alpha||W|| regulariser, warm-up) with the
    exact projection finds the permutation between a net and its permuted copy."""
    model, x, y = digits_model
    twin, perms = permute_hidden_units(model, seed=3, sigma=0.0)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    clean = evaluate_accuracy(model, xte, yte)
    alive = (extract_features(twin, xtr)["1"] > 0).any(0).numpy()
    cfg = StitchConfig(kind="permutation", projection="exact", epochs=16, lr=0.01, alpha=1.0)
    stitched, _ = stitch_models(model, twin, "1", xtr, ytr, cfg)
    np.testing.assert_array_equal(stitched.stitch.permutation()[alive], perms[0].numpy()[alive])
    assert evaluate_accuracy(stitched, xte, yte) == pytest.approx(clean, abs=0.01)


def test_over_pairs_is_mean_sd_and_standard_error_by_hand():
    from modelsense.representations.stitch_sweep import over_pairs

    values = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])  # 3 repeats of 2 layers
    mean, sd, se = over_pairs(values)
    np.testing.assert_allclose(mean, [3.0, 1.0])
    np.testing.assert_allclose(sd, [np.sqrt(7.0), np.sqrt(3.0)])  # Σ(x - mean)² / (R - 1): 14/2, 6/2
    np.testing.assert_allclose(se, sd / np.sqrt(3))
    with pytest.raises(ConfigError, match="at least 2"):
        over_pairs(values[:1])


def test_combine_sweeps_means_over_pairs_by_hand():
    from modelsense.representations.stitch_sweep import StitchSweep, combine_sweeps, stitching_text

    def sweep(clean, acc):
        return StitchSweep(["l1", "l2"], ["linear"], clean, {"linear": acc},
                           {"linear": [float(np.mean(clean)) - a for a in acc]}, {"linear": [0.1, 0.2]},
                           {"linear": [1.0, 2.0]}, {"linear": [{}, {}]})

    arrays, one = combine_sweeps([sweep((0.9, 0.7), [0.6, 0.4])])
    assert one["penalty"] == {"linear": [pytest.approx(0.2), pytest.approx(0.4)]} and "repeats" not in one
    assert one["final_loss"] == {"linear": [0.1, 0.2]} and arrays["penalty"].shape == (1, 1, 2)
    arrays, two = combine_sweeps([sweep((0.9, 0.7), [0.6, 0.4]), sweep((1.0, 0.8), [0.9, 0.9])])
    by_pair = np.array([[0.2, 0.4], [0.0, 0.0]])
    np.testing.assert_allclose(arrays["penalty"][:, 0], by_pair, atol=1e-12)
    np.testing.assert_allclose(two["penalty"]["linear"], [0.1, 0.2])
    np.testing.assert_allclose(two["penalty_std"]["linear"], by_pair.std(0, ddof=1))
    np.testing.assert_allclose(two["penalty_se"]["linear"], by_pair.std(0, ddof=1) / np.sqrt(2))
    assert two["mean_penalty"]["linear"] == pytest.approx(0.15)
    assert two["mean_penalty_std"]["linear"] == pytest.approx(np.std([0.3, 0.0], ddof=1))
    assert two["clean_accuracy"] == pytest.approx([0.95, 0.75]) and two["repeats"] == 2
    assert len(two["final_loss"]) == 2
    assert "±" in stitching_text({**two, "pairs": [[0, 1], [0, 2]]}) and "±" not in stitching_text(one)


def test_comparison_metrics_report_distances_only_for_the_procrustes_metrics():
    from modelsense.representations.compare import comparison_metrics

    res = {"matrix": np.array([[0.9, 0.2], [0.3, 0.6]]), "layers": ["a1", "a2"], "layers_b": ["a1", "a2"]}
    m = comparison_metrics(res, "procrustes")
    assert m["diagonal"] == [0.9, 0.6] and m["diagonal_distance"] == pytest.approx([0.1, 0.4])
    assert "layers_b" not in m and m["value"] == "similarity" and m["matrix"] == [[0.9, 0.2], [0.3, 0.6]]
    m = comparison_metrics({**res, "layers_b": ["b1", "b2"]}, "CKA")
    assert m["metric"] == "cka" and m["layers_b"] == ["b1", "b2"] and "diagonal_distance" not in m
