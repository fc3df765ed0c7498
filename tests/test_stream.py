"""Data of any size (`modelsense.data.stream`): a map-style Dataset or a DataLoader goes in wherever
tensors do, with the same numbers.

Checked on the contract test's tiny problem (24 training, 6 test examples, float64): for every
registered method, scores and self-influences from a Dataset and from a DataLoader (batch size 7,
which does not divide 24, shuffle=False) equal the tensor path; a dict-input collate_fn with a user
`BatchAdapter` gives the tensor path's numbers for every method that streams and a clear refusal
for the others; a shuffled DataLoader is refused (results are indexed by position); a method that
reads the data whole refuses a set above the memory budget; streaming methods never gather more
than a chunk; curvature operators built from a DataLoader equal those built from tensors; a saved
state loads with the Dataset of the tensors it was fitted on.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SubsetRandomSampler,
    TensorDataset,
)

from modelsense.attribution import (
    ComputeOptions,
    load_attributor,
    make_attributor,
    method_class,
    method_names,
)
from modelsense.core.functional import FunctionalModel
from modelsense.curvature.operators import build_curvature
from modelsense.data.stream import BatchAdapter, as_examples
from modelsense.errors import DataError
from test_attribution_contract import MODEL, XT, YT, X, Y, build

METHODS = method_names()


def close(a, b):
    return torch.allclose(a, b, rtol=1e-7, atol=1e-9)


def loader(x, y, bs=7, **kw):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_dataset_and_dataloader_equal_tensors(method):
    ref = build(method).fit(MODEL, X, Y)
    for train, test in ((TensorDataset(X, Y), TensorDataset(XT, YT)), (loader(X, Y), loader(XT, YT, bs=4))):
        att = build(method).fit(MODEL, train)
        assert att.n_train == len(X)
        assert close(att.self_scores(), ref.self_scores()), method
        if att.pairwise:
            s = att.scores(test)
            assert s.shape == (len(X), len(XT)) and close(s, ref.scores(XT, YT)), method
            assert close(att.scores((XT, YT)), s)


class DictItems(Dataset):
    """Items {"head": x[:2], "tail": x[2:], "label": y}: a user's own layout."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"head": self.x[i, :2], "tail": self.x[i, 2:], "label": self.y[i]}


class DictBatch(BatchAdapter):
    def inputs(self, batch):
        return {"head": batch["head"], "tail": batch["tail"]}

    def labels(self, batch):
        return batch["label"]


class DictModel(nn.Sequential):
    """The contract test's MLP (the same layers, the same parameter names) with a forward taking the dict."""

    def forward(self, inputs):
        return super().forward(torch.cat([inputs["head"], inputs["tail"]], dim=-1))


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("method", METHODS)
def test_dict_inputs_with_a_user_adapter(method):
    train = DataLoader(DictItems(X, Y), batch_size=5, collate_fn=collate)
    test = DataLoader(DictItems(XT, YT), batch_size=5, collate_fn=collate)
    att = build(method)
    if not att.streams():
        with pytest.raises(DataError, match="tensor inputs only"):
            att.fit(DictModel(*MODEL), train, adapter=DictBatch())
        return
    ref = build(method).fit(MODEL, X, Y)
    att.fit(DictModel(*MODEL), train, adapter=DictBatch())
    assert close(att.self_scores(), ref.self_scores()), method
    if att.pairwise:
        assert close(att.scores(test, adapter=DictBatch()), ref.scores(XT, YT)), method


def test_shuffled_dataloader_is_refused():
    att = build("if-ekfac")
    shuffled = DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=True)
    with pytest.raises(DataError, match="shuffle=False"):
        att.fit(MODEL, shuffled)
    order = BatchSampler(SubsetRandomSampler(range(len(X))), batch_size=5, drop_last=False)
    with pytest.raises(DataError, match="shuffle=False"):
        att.fit(MODEL, DataLoader(TensorDataset(X, Y), batch_sampler=order))
    fitted = build("grad-dot").fit(MODEL, X, Y)
    with pytest.raises(DataError, match="shuffle=False"):
        fitted.scores(DataLoader(TensorDataset(XT, YT), batch_size=2, shuffle=True))


def test_bad_streams_are_refused():
    with pytest.raises(DataError, match="carries its own labels"):
        build("grad-dot").fit(MODEL, TensorDataset(X, Y), Y)
    with pytest.raises(DataError, match="empty"):
        build("grad-dot").fit(MODEL, TensorDataset(X[:0], Y[:0]))
    with pytest.raises(DataError, match="labels must lie in"):
        build("grad-dot").fit(MODEL, TensorDataset(X, Y + 5))
    with pytest.raises(DataError, match="not a pair"):
        build("grad-dot").fit(MODEL, DictItems(X, Y))


def test_reading_whole_above_the_budget_is_refused():
    # el2n trains models on the data as tensors: it reads it whole, within the budget only
    att = make_attributor("el2n", el2n_repeat=1, compute=ComputeOptions(progress=False, memory_budget=100))
    assert not att.streams()
    with pytest.raises(DataError, match="above the memory budget"):
        att.fit(MODEL, TensorDataset(X, Y))


class Counting(Dataset):
    """A Dataset that records how many items each gather reads (through a batch sampler-free loop)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


class Batches(BatchAdapter):
    def __init__(self):
        self.sizes = []

    def collate(self, items):
        self.sizes.append(len(items))
        return super().collate(items)


@pytest.mark.parametrize("method", ["if-ekfac", "grad-dot", "arnoldi", "tracin"])
def test_streaming_reads_one_chunk_at_a_time(method):
    adapter = Batches()
    att = build(method, chunk_size=4, block_size=5)
    ref = build(method, chunk_size=4, block_size=5).fit(MODEL, X, Y)
    att.fit(MODEL, Counting(X, Y), adapter=adapter)
    assert close(att.scores(XT, YT), ref.scores(XT, YT))
    assert close(att.self_scores(), ref.self_scores())
    assert max(adapter.sizes) <= 64  # the first-batch check reads min(N, 64); every pass then a chunk
    assert max(adapter.sizes[1:]) <= 5


@pytest.mark.parametrize("structure", ["ekfac", "kfac", "implicit", "diag", "gram"])
def test_curvature_from_a_dataloader(structure):
    fm = FunctionalModel(MODEL)
    K = build_curvature(fm, loader(X, Y), structure=structure, chunk_size=5)
    ref = build_curvature(fm, X, Y, structure=structure, chunk_size=5)
    v = torch.randn(fm.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert close(K.mv(v), ref.mv(v))
    assert close(K.inverse_mv(v, 0.5), ref.inverse_mv(v, 0.5))


def test_saved_state_loads_with_the_dataset_of_its_tensors(tmp_path):
    att = build("if-ekfac").fit(MODEL, X, Y)
    att.save(tmp_path / "state")
    back = load_attributor(tmp_path / "state", MODEL, TensorDataset(X, Y), compute=ComputeOptions(progress=False))
    assert close(back.scores(XT, YT), att.scores(XT, YT))
    from modelsense.errors import ConfigError

    with pytest.raises(ConfigError, match="other training data"):
        load_attributor(tmp_path / "state", MODEL, TensorDataset(X, (Y + 1) % 3))


def test_examples_gather_by_index():
    ex = as_examples(loader(X, Y, bs=7))
    assert len(ex) == len(X)
    idx = torch.tensor([5, 0, 23])
    xb, yb = ex.get(idx)
    assert torch.equal(xb, X[idx]) and torch.equal(yb, Y[idx])
    assert torch.equal(torch.cat([b[0] for b in ex.batches(7)]), X)
    assert method_class("if-ekfac")().streams() and not method_class("el2n")().streams()


def test_feature_blocks_shrink_to_the_memory_budget():
    # P = 38 float64 gradients: 304 bytes a row; a budget of 8 x 3 rows makes blocks of 3 rows (not 50)
    adapter = Batches()
    att = build("if-ekfac", chunk_size=4, block_size=50, memory_budget=8 * 304 * 3)
    assert att._block_rows(304) == 3
    att.fit(MODEL, Counting(X, Y), adapter=adapter)
    ref = build("if-ekfac").fit(MODEL, X, Y)
    assert close(att.self_scores(), ref.self_scores())
    assert close(att.scores(XT, YT), ref.scores(XT, YT))
    assert max(adapter.sizes[1:]) <= 4


def test_engine_gathers_batches_from_a_dataset():
    """The retraining engine on a Dataset (batches gathered by index) equals it on tensors, for a
    DataLoader too (queries as a Dataset and a DataLoader)."""
    from modelsense.training import TrainConfig
    from modelsense.training.ensemble import train_ensemble

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    xt, yt = torch.randn(9, 3, generator=g), torch.randint(0, 3, (9,), generator=g)
    masks = torch.rand(3, 40, generator=g) < 0.6
    cfg = TrainConfig(lr=0.1, epochs=3, bs=8, delta=1.0)

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))

    ref = train_ensemble(net, x, y, masks, cfg, queries={"test": (xt, yt), "train": (x, y)}, progress=False)
    lazy = train_ensemble(net, TensorDataset(x, y), None, masks, cfg,
                          queries={"test": TensorDataset(xt, yt), "train": loader(x, y)}, progress=False)
    for q in ("test", "train"):
        for k in ("logits", "loss", "correct"):
            torch.testing.assert_close(lazy.outputs[q][k], ref.outputs[q][k], rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="shuffle=False"):
        train_ensemble(
            net, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), None, masks, cfg, progress=False
        )


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_laplace_posterior_and_mpe_from_a_dataloader(structure):
    from modelsense.curvature.posterior import laplace
    from modelsense.mpe import mpe_scores

    fm = FunctionalModel(MODEL)
    post = laplace(fm, loader(X, Y), structure=structure, prior_precision=1.0, chunk_size=5)
    ref = laplace(fm, X, Y, structure=structure, prior_precision=1.0, chunk_size=5)
    assert post.log_marginal_likelihood() == pytest.approx(ref.log_marginal_likelihood(), rel=1e-9)
    assert close(post.predictive_covariance(XT), ref.predictive_covariance(XT))
    got, want = mpe_scores(post, loader(X, Y), chunk_size=5), mpe_scores(ref, X, Y, chunk_size=5)
    assert close(got.loo_nll, want.loo_nll)


def test_spectrum_and_features_from_a_dataloader():
    from modelsense.curvature.spectrum import SpectrumConfig, compute_spectrum
    from modelsense.representations.features import extract_features

    fm = FunctionalModel(MODEL)
    cfg = SpectrumConfig(k=3, trace_samples=4, chunk_size=5)
    got, want = compute_spectrum(fm, loader(X, Y), config=cfg), compute_spectrum(fm, X, Y, cfg)
    assert close(got.eigenvalues, want.eigenvalues)
    assert got.trace.estimate == pytest.approx(want.trace.estimate, rel=1e-9)
    feats, ref = (
        extract_features(MODEL, loader(X, Y), ["1"], batch_size=5),
        extract_features(MODEL, X, ["1"], batch_size=5),
    )
    assert close(feats["1"], ref["1"])


@pytest.mark.parametrize("method", ["if-ekfac", "randproj", "arnoldi"])
@pytest.mark.parametrize("precision,tol", [("bfloat16", 5e-2), ("float16", 5e-3)])
def test_low_precision_gradients_stay_close_to_full(method, precision, tol):
    """ComputeOptions.precision: per-example gradients in bf16 / fp16, written into float32 (measured
    on this problem: bf16 about 1%, fp16 about 0.1% relative Frobenius error); the result dtype stays."""
    import copy

    m, x, xt = copy.deepcopy(MODEL).float(), X.float(), XT.float()
    ref = build(method).fit(m, x, Y)
    low = build(method, precision=precision).fit(m, x, Y)
    s, r = low.scores(xt, YT), ref.scores(xt, YT)
    assert s.dtype == torch.float32
    assert 0 < float((s - r).norm() / r.norm()) < tol
    assert float((low.self_scores() - ref.self_scores()).norm() / ref.self_scores().norm()) < tol


def test_precision_is_validated():
    from modelsense.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of"):
        ComputeOptions(precision="float8")
