"""The contract every registered attribution method keeps, checked over `method_names()` (as
scikit-learn's `check_estimator` does for every estimator): a newly registered method is covered
without editing this file (give it small settings in FAST if its defaults are slow).

Checks: declarations (named settings, `needs`), settings validated in `__init__` (every numeric
setting refuses NaN and -1, every string setting an unknown choice), not-fitted errors, shapes and
dtypes of `scores` (N, M) and `self_scores` (N,), `self_scores()[i] == scores(train)[i, i]`, bad input
(wrong feature shape, labels out of range, NaN inputs), and the save / load round trip with its
refusals; `by_module=True` sums to the total where the method splits over modules, else is refused.
Exempt: `loss`, `el2n`, `fscore`, `cl`, `knn`, `random`, `mpe` have no pairwise scores (self-influence only), so the
diagonal check and the pairwise shape and input checks of `scores` do not apply to them; their
self-scores and fitting inputs are checked. Stochastic methods (randproj, tracin-rp, if-lissa,
arnoldi's start vector, gex, tracinrp-fge, la-kfac, trak, el2n, cl, random) are seeded: self-scores and scores of
one fit use the same draws, so they are held to the same diagonal tolerance as the exact methods, and a
second fit with the same seed must give the same self-scores.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsense.attribution import (
    COMPUTE_OPTIONS,
    NEEDS,
    ComputeOptions,
    load_attributor,
    make_attributor,
    method_class,
    method_names,
    method_settings,
)
from modelsense.errors import ConfigError, DataError

QUIET = ComputeOptions(progress=False)
METHODS = method_names()

#: settings that keep a method fast on the tiny problem (the defaults otherwise)
FAST = {
    "randproj": {"proj_dim": 5},
    "tracin-rp": {"proj_dim": 5},
    "if-lissa": {"lissa_depth": 20, "lissa_batch": 8},
    "if-kfac": {"n_models": 2},  # an ensemble: the trained members and their curvatures are saved too
    "arnoldi": {"rank": 6},
    "gex": {"num_ens": 3, "ft_step": 5, "ft_lr": 0.05, "ft_bs": 8},
    "tracinrp-fge": {"num_ens": 2, "ft_step": 5, "ft_lr": 0.05, "ft_bs": 8, "proj_dim": 5},
    "la-kfac": {"num_ens": 6},
    "trak": {"n_models": 2, "proj_dim": 5},
    "el2n": {"el2n_repeat": 2},
}
#: numeric settings for which a negative value is valid
NEGATIVE_OK = {"seed"}


def tiny_mlp(seed=0, width=5, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(1)
    model = tiny_mlp()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:24]), y[:24], reduction="sum") + 0.5 * sum(
            p.pow(2).sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval(), x[:24], y[:24], x[24:], y[24:]


MODEL, X, Y, XT, YT = _problem()


def context(method):
    """What an orchestrator supplies for each need the method declares."""
    from modelsense.training import TrainConfig

    base = {k: v.detach() for k, v in MODEL.named_parameters()}
    supplies = {
        "checkpoints": {"checkpoints": [{k: v + 0.05 for k, v in base.items()}, base], "learning_rates": [0.5, 0.1]},
        "recipe": {"train_config": TrainConfig(epochs=2, lr=0.1, bs=8),
                   "model_fn": lambda s: tiny_mlp(seed=int(s), dtype=torch.float32)},
        "prior_precision": {"prior_precision": 1.0},
        "delta": {"delta": 1.0},
        "optimizer_state": {},  # the model here was not trained by ivon / adam: the Laplace posterior
    }
    out = {}
    for need in method_class(method).needs:
        out.update(supplies[need])
    return out


def build(method, **extra):
    return make_attributor(method, {**context(method), **FAST.get(method, {}), **extra}, compute=QUIET)


_FITTED = {}


def fitted(method):
    """One fit per method for the whole module (the checks below only read it)."""
    if method not in _FITTED:
        _FITTED[method] = build(method).fit(MODEL, X, Y)
    return _FITTED[method]


def _kinds(annotation) -> set[str]:
    if annotation is inspect.Parameter.empty or not isinstance(annotation, str):
        return set()
    return {part.strip() for part in annotation.split("|")}


def _numeric(p) -> bool:
    kinds = _kinds(p.annotation)
    return bool(kinds) and kinds <= {"int", "float", "None"} and bool(kinds & {"int", "float"})


# -- declarations and settings --------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_declarations(method):
    cls = method_class(method)
    params = inspect.signature(cls.__init__).parameters.values()
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    assert set(cls.needs) <= set(NEEDS)
    att = make_attributor(method)
    assert list(att.settings()) == list(cls.setting_names())
    assert set(method_settings(method)) == set(cls.setting_names()) | set(COMPUTE_OPTIONS)
    for need in cls.needs:
        assert set(NEEDS[need]) <= set(cls.setting_names()), need
    with pytest.raises(ConfigError, match="'no_such_setting' is a setting of no method"):
        make_attributor(method, no_such_setting=1)
    with pytest.raises(TypeError):
        cls(no_such_setting=1)


@pytest.mark.parametrize("method", METHODS)
def test_settings_are_validated_in_init(method):
    params = inspect.signature(method_class(method).__init__).parameters.values()
    numeric = [p.name for p in params if _numeric(p)]
    choices = [p.name for p in params if _kinds(p.annotation) == {"str"}]
    assert "seed" in numeric and "loss" in choices
    for name in numeric:
        bad = [math.nan, math.inf] + ([] if name in NEGATIVE_OK else [-1])
        for value in bad:
            with pytest.raises(ConfigError, match=name.split("_")[-1]):
                make_attributor(method, **{name: value})
    for name in choices:
        with pytest.raises(ConfigError, match="no-such-choice"):
            make_attributor(method, **{name: "no-such-choice"})
    for name, value in (("chunk_size", 0), ("block_size", math.nan), ("memory_budget", -1), ("block_size", 2.5)):
        with pytest.raises(ConfigError, match=name):
            make_attributor(method, **{name: value})


@pytest.mark.parametrize("method", METHODS)
def test_not_fitted_errors(method, tmp_path):
    att = build(method)
    for call in (att.self_scores, lambda: att.scores(XT, YT), lambda: att.save(tmp_path / "s")):
        with pytest.raises(ConfigError, match="not fitted"):
            call()
    assert not (tmp_path / "s").exists()


# -- results ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_dtypes(method):
    att = fitted(method)
    s = att.self_scores()
    assert s.shape == (len(X),) and s.dtype == torch.float64 and s.device.type == "cpu"
    assert bool(torch.isfinite(s).all())
    if not method_class(method).pairwise:
        with pytest.raises(ConfigError, match="self-influence only"):
            att.scores(XT, YT)
        return
    S = att.scores(XT, YT)
    assert S.shape == (len(X), len(XT)) and S.dtype == torch.float64 and S.device.type == "cpu"
    assert bool(torch.isfinite(S).all())


@pytest.mark.parametrize("method", METHODS)
def test_self_scores_are_the_diagonal_of_the_train_scores(method):
    if not method_class(method).pairwise:
        pytest.skip(f"{method} has a self-influence only")
    att = fitted(method)
    diag = torch.diagonal(att.scores(X, Y))
    scale = float(diag.abs().max())
    torch.testing.assert_close(att.self_scores(), diag, rtol=1e-6, atol=1e-9 * scale)


@pytest.mark.parametrize("method", METHODS)
def test_a_fit_with_the_same_seed_gives_the_same_scores(method):
    """Stochastic methods draw from their `seed` only (projections, samples, fine-tuning, ensembles)."""
    again = build(method).fit(MODEL, X, Y)
    torch.testing.assert_close(again.self_scores(), fitted(method).self_scores(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_bad_input(method):
    nan_x = X.clone()
    nan_x[3, 1] = math.nan
    for x, y, says in ((X[:, :2], Y, "shape"), (X, Y + 3, r"labels must lie in \[0, 3\)"), (nan_x, Y, "NaN")):
        with pytest.raises(DataError, match=says):
            build(method).fit(MODEL, x, y)
    att = fitted(method)
    if not method_class(method).pairwise:
        return
    nan_xt = XT.clone()
    nan_xt[0, 0] = math.inf
    for x, y, says in ((XT[:, :2], YT, "shape"), (XT, YT - 1, r"labels must lie in \[0, 3\)"), (nan_xt, YT, "NaN")):
        with pytest.raises(DataError, match=says):
            att.scores(x, y)


@pytest.mark.parametrize("method", METHODS)
def test_by_module_sums_to_the_total_or_is_refused(method):
    """by_module=True: {module: (N, M)} / {module: (N,)} summing to scores / self_scores, where the method
    splits exactly over modules; elsewhere a ConfigError naming the methods that do."""
    att = fitted(method)
    if not method_class(method).splits_by_module:
        calls = [lambda: att.self_scores(by_module=True)]
        if method_class(method).pairwise:
            calls.append(lambda: att.scores(XT, YT, by_module=True))
        for call in calls:
            with pytest.raises(ConfigError, match="by_module is available for grad-dot, grad-cos, tracin"):
                call()
        return
    parts = att.scores(XT, YT, by_module=True)
    assert list(parts) == ["0", "2"]  # the two Linear layers of tiny_mlp
    total = att.scores(XT, YT)
    assert all(p.shape == total.shape and p.dtype == total.dtype for p in parts.values())
    scale = float(total.abs().max())
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-9, atol=1e-12 * scale)
    self_parts = att.self_scores(by_module=True)
    torch.testing.assert_close(sum(self_parts.values()), att.self_scores(), rtol=1e-9, atol=1e-12 * scale)
    with pytest.raises(ConfigError, match="drop out="):
        att.scores(XT, YT, out=torch.zeros(len(X), len(XT), dtype=torch.float64).numpy(), by_module=True)


# -- saved state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    att = fitted(method)
    att.save(tmp_path / "state")
    again = build(method).load(tmp_path / "state", MODEL, X, Y)
    rebuilt = load_attributor(tmp_path / "state", MODEL, X, Y, compute=QUIET)
    assert type(rebuilt) is type(att)
    for other in (again, rebuilt):
        torch.testing.assert_close(other.self_scores(), att.self_scores(), rtol=1e-10, atol=0)
        if method_class(method).pairwise:
            torch.testing.assert_close(other.scores(XT, YT), att.scores(XT, YT), rtol=1e-10, atol=0)
    stored = {k: v for k, v in rebuilt.settings().items() if not callable(v) and v is not None}
    for k, v in stored.items():
        if not isinstance(v, (list, tuple)):  # scalar settings come back as they were
            assert v == att.settings()[k], k
    # the folder holds one state: refused unless overwrite
    with pytest.raises(ConfigError, match="overwrite=True"):
        att.save(tmp_path / "state")
    att.save(tmp_path / "state", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        att.save(tmp_path / "other")


@pytest.mark.parametrize("method", METHODS)
def test_load_refuses_another_method_settings_model_or_data(method, tmp_path):
    att = fitted(method)
    path = att.save(tmp_path / "state")
    other = METHODS[(METHODS.index(method) + 1) % len(METHODS)]
    cases = [
        (lambda: build(other).load(path, MODEL, X, Y), f"state of method '{method}', not '{other}'"),
        (lambda: build(method, seed=7).load(path, MODEL, X, Y), r"other settings: setting seed: 7 \(saved: 0\)"),
    ]
    nudged = tiny_mlp()
    nudged.load_state_dict(MODEL.state_dict())
    with torch.no_grad():
        nudged[2].bias[0] += 1e-3
    cases += [
        (lambda: build(method).load(path, nudged, X, Y), "another model: its parameter values differ"),
        (lambda: build(method).load(path, tiny_mlp(width=4), X, Y), r"another model: 0.weight has shape \(4, 3\)"),
        (lambda: build(method).load(path, MODEL, X[:20], Y[:20]), "other training data: examples 20 \\(saved: 24\\)"),
        (lambda: build(method).load(path, MODEL, X + 1e-6, Y), "other training data: the same number"),
        (lambda: build(method).load(tmp_path, MODEL, X, Y), "holds no saved attributor state"),
    ]
    for call, says in cases:
        with pytest.raises(ConfigError, match=says):
            call()
    refused = build(method)
    with pytest.raises(ConfigError):
        refused.load(path, nudged, X, Y)
    with pytest.raises(ConfigError, match="not fitted"):  # a refused load leaves it unfitted
        refused.self_scores()
