"""Invariance probes (modelsense.representations.probes): random group elements at one layer, the network's
function, and every similarity metric between the features before and after."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ReusedReLU
from modelsense.errors import ConfigError, DataError
from modelsense.representations.metrics import SIMILARITIES
from modelsense.representations.probes import (
    INVARIANT,
    SITES,
    TRANSFORMS,
    intertwine,
    invariance_probe,
    random_transform,
)

f64 = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3)).eval()


def inputs(n, *shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [1, 5, 16])
def test_random_transforms_are_elements_of_their_groups(c):
    def g():
        return torch.Generator().manual_seed(c)
    q = random_transform("orthogonal", c, g())
    torch.testing.assert_close(q.T @ q, torch.eye(c, dtype=f64), atol=1e-12, rtol=0)
    m = random_transform("grelu", c, g())
    assert (m >= 0).all() and ((m > 0).sum(0) == 1).all() and ((m > 0).sum(1) == 1).all()  # P D: one entry per row/col
    a = random_transform("invertible", c, g())
    assert torch.linalg.matrix_rank(a) == c and (
        c == 1 or not torch.allclose(a.T @ a, torch.eye(c, dtype=f64), atol=1e-3)
    )
    torch.testing.assert_close(random_transform("grelu", c, g()), m, atol=0, rtol=0)  # seeded
    # the original's scales exp(sigma g) / exp(sigma^2 / 2); sigma = 0 leaves a bare permutation
    p = random_transform("grelu", c, g(), sigma=0.0)
    torch.testing.assert_close(p.sum(0), torch.ones(c, dtype=f64), atol=1e-15, rtol=0)
    with pytest.raises(ConfigError, match="unknown transform 'rotation'"):
        random_transform("rotation", c, g())


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (convnet, (2, 4, 4))])
@torch.no_grad()
def test_grelu_compensated_in_the_next_layer_leaves_the_function_unchanged(make, shape):
    model, x = make(), inputs(40, *shape)
    out = model(x)
    channels = 12 if shape == (6,) else 5
    for kind in TRANSFORMS:
        changed = intertwine(model, "1", random_transform(kind, channels, torch.Generator().manual_seed(3)))
        diff = float((changed(x) - out).abs().max())
        if kind == "grelu":
            assert diff <= 1e-5 * float(out.abs().max())
        else:
            assert diff > 1e-2
    # the copy is a copy: the original model is untouched
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (convnet, (2, 4, 4))])
def test_invariant_metrics_give_one_and_the_others_do_not(make, shape):
    model, x = make(), inputs(60, *shape, seed=1)
    y = model(x).argmax(-1)
    res = invariance_probe(model, ["1", "3"], x, y, repeats=2, seed=5)
    assert res.metrics == list(SIMILARITIES) and res.clean_accuracy == 1.0
    for layer in ("1", "3"):
        for kind in TRANSFORMS:
            pre = res.similarity[(layer, kind, "pre")]
            for m, values in pre.items():
                assert len(values) == 2
                if m in INVARIANT[kind]:
                    assert max(abs(1 - v) for v in values) < 1e-5, (layer, kind, m, values)
                else:
                    assert max(values) < 0.99, (layer, kind, m, values)
            post = res.similarity[(layer, kind, "post")]
            for m in INVARIANT["grelu"]:  # ReLU(P D z) = P D ReLU(z): the G_ReLU metrics see the same features
                if kind == "grelu":
                    assert max(abs(1 - v) for v in post[m]) < 1e-5
            if kind == "grelu":
                assert max(res.output_change[(layer, kind)]) < 1e-4 and res.accuracy[(layer, kind)] == [1.0, 1.0]
            else:  # ReLU does not commute with a rotation: no metric sees the same features after the ReLU
                assert max(max(v) for v in post.values()) < 0.99
                assert min(res.output_change[(layer, kind)]) > 1e-3
    assert res.channels == ({"1": 12, "3": 10} if shape == (6,) else {"1": 5, "3": 4})


def test_probe_is_reproducible_and_repeats_draw_new_transforms():
    model, x = mlp(), inputs(30, 6)
    a = invariance_probe(model, ["1"], x, transforms=["invertible"], metrics=["cka"], repeats=2, seed=0)
    b = invariance_probe(model, ["1"], x, transforms=["invertible"], metrics=["cka"], repeats=2, seed=0)
    values = a.similarity[("1", "invertible", "pre")]["cka"]
    assert values == b.similarity[("1", "invertible", "pre")]["cka"] and values[0] != values[1]
    assert set(a.similarity) == {("1", "invertible", s) for s in SITES} and a.clean_accuracy is None


def test_probe_refuses_bad_input():
    model, x = mlp(), inputs(30, 6)
    with pytest.raises(ConfigError, match="unknown transform 'shear'"):
        invariance_probe(model, ["1"], x, transforms=["shear"])
    with pytest.raises(ConfigError, match="unknown similarity 'cca'"):
        invariance_probe(model, ["1"], x, metrics=["cca"])
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        invariance_probe(model, ["1"], x, repeats=0)
    with pytest.raises(ConfigError, match="no module named 'relu9'"):
        invariance_probe(model, ["relu9"], x)
    with pytest.raises(DataError, match="at least 4 examples"):
        invariance_probe(model, ["1"], x[:3])

    with pytest.raises(ConfigError, match="called more than once per forward pass"):
        invariance_probe(ReusedReLU(), ["act"], x)
    with pytest.raises(ConfigError, match=r"module 'b' maps \(6,\) to \(3,\); probe an activation module"):
        invariance_probe(ReusedReLU(), ["b"], x, metrics=["cka"])


def test_probe_table_by_hand():
    """One layer, two transforms, two metrics, two repeats: means, sd, the cells that must give 1 and the
    deviations over them, from the result's lists."""
    from modelsense.representations.probes import ProbeResult, probe_table, probe_table_text

    res = ProbeResult(["act1"], ["orthogonal", "grelu"], ["cka", "relu-cka"], 2, clean_accuracy=0.5,
                      channels={"act1": 3})
    values = {("orthogonal", "pre"): ([1.0, 0.98], [0.4, 0.6]), ("orthogonal", "post"): ([0.9, 0.7], [0.5, 0.5]),
              ("grelu", "pre"): ([0.8, 0.6], [1.0, 0.99]), ("grelu", "post"): ([0.7, 0.5], [0.97, 1.0])}
    for (t, site), (cka, relu) in values.items():
        res.similarity[("act1", t, site)] = {"cka": cka, "relu-cka": relu}
    res.output_change = {("act1", "orthogonal"): [0.3, 0.1], ("act1", "grelu"): [1e-7, 2e-7]}
    res.accuracy = {("act1", "orthogonal"): [0.4, 0.2], ("act1", "grelu"): [0.5, 0.5]}
    table = probe_table(res)
    m = table.metrics
    assert m["table"]["act1"]["orthogonal"]["pre"]["cka"] == pytest.approx(0.99)
    assert m["table_std"]["act1"]["grelu"]["post"]["cka"] == pytest.approx(np.std([0.7, 0.5], ddof=1))
    # must give 1: cka for orthogonal at pre; relu-cka for grelu at pre and post
    assert table.invariant.tolist() == [[True, False], [False, False], [False, True], [False, True]]
    assert table.rows == ["act1 orthogonal pre", "act1 orthogonal post", "act1 grelu pre", "act1 grelu post"]
    assert m["max_deviation_invariant"] == pytest.approx(0.03)
    assert m["min_similarity_not_invariant"] == pytest.approx(0.4)
    assert m["output_change"]["act1"] == {"orthogonal": 0.3, "grelu": 2e-7}
    assert m["accuracy"]["act1"]["orthogonal"] == pytest.approx(0.3)
    assert table.arrays["similarity"].shape == (1, 2, 2, 2, 2)
    assert "orthogonal  pre" in probe_table_text({**m, "n_examples": 4})
