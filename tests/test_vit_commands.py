"""Every command that takes a model, end to end through the CLI on the tiny vision transformer `vit`
(issue #12): one `modelsense train --model vit` run (a module fixture), then each command on its
model.pt (`--checkpoint`) or, where the command trains its models itself (zoo, memorization, the mpe
experiments, noisy-labels / relabel on corrupted labels), on `--model vit` at the same tiny size.

Each test asserts exit code 0 and numbers that can fail (the definition where it is cheap: grad-dot
against a loop, the spectrum against the dense Hessian, a model compared with itself); what vit cannot
do is refused with a ConfigError that says why, before anything is written.
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.attribution import by_module_names, method_class, method_names
from modelsense.cli import app
from modelsense.core.functional import FunctionalModel
from modelsense.curvature import dense_matrix
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.models.checkpoint import load_model
from modelsense.models.vit import ViT

runner = CliRunner()
N_TRAIN, N_TEST = 60, 4
DATA = ["--dataset", "digits", "--n-train", N_TRAIN]
# 8x8 digits in 4x4 patches: 4 tokens of width 8, two blocks (P = 1,474)
NET = ["--model", "vit", "--width", "8", "--depth", "2", "--patch", "4"]
TRAIN = ["--optimizer", "adam", "--lr", "0.01", "--bs", "32"]
BLOCKS = "blocks.0,blocks.1"  # the features of its blocks (vit has no nn.ReLU for the default --layers all)
PAIRWISE = [m for m in method_names() if method_class(m).pairwise]
SELF_ONLY = [m for m in method_names() if not method_class(m).pairwise]
SMALL = {"gex": ["--num-ens", 2, "--ft-step", 5], "tracinrp-fge": ["--num-ens", 2, "--ft-step", 5]}  # fewer runs


def invoke(*args):
    return runner.invoke(app, [*map(str, args), "--quiet"])


def ok(*args) -> dict:
    """Run a command that must succeed; its metrics.json."""
    res = invoke(*args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = args[list(args).index("--out") + 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    return metrics


def refused(*args) -> str:
    """Run a command that must be refused with a ConfigError before writing anything; its message."""
    res = invoke(*args)
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), (res.output, res.exception)
    assert not args[list(args).index("--out") + 1].exists()  # validated before anything is written
    return str(res.exception)


def is_top(indices: list[int], values: np.ndarray) -> bool:
    """`indices` are the len(indices) largest of `values`, in decreasing order (ties in any order)."""
    return np.array_equal(values[indices], np.sort(values)[::-1][: len(indices)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`modelsense train --model vit` with epoch checkpoints (tracin); its run directory."""
    out = tmp_path_factory.mktemp("vit") / "train"
    metrics = ok("train", *DATA, *NET, *TRAIN, "--epochs", "4", "--checkpoint-epochs", "2,4", "--out", out)
    assert metrics["n_params"] == 1474 and np.isfinite(metrics["train_nll"])
    module, _ = load_model(out / "model.pt")
    assert isinstance(module, ViT) and len(module.blocks) == 2
    return out


@pytest.fixture(scope="module")
def data():
    return load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))


def checkpoint(trained) -> list:
    return ["--checkpoint", trained / "model.pt"]


# --- influence: every method of the registry --------------------------------------------------------------
@pytest.mark.parametrize("method", PAIRWISE)
def test_influence_of_every_pairwise_method_on_vit(method, trained, tmp_path):
    out = tmp_path / "inf"
    m = ok("influence", *DATA, *checkpoint(trained), "--method", method, "--n-test", N_TEST,
           *SMALL.get(method, []), "--out", out)
    scores = np.load(out / "scores.npy")
    assert scores.shape == (N_TRAIN, N_TEST) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    for j in range(N_TEST):  # the summary reads these scores
        assert is_top(m["top_helpful"][j], scores[:, j]) and is_top(m["top_harmful"][j], -scores[:, j])


@pytest.mark.parametrize("method", SELF_ONLY)
def test_self_influence_of_every_self_only_method_on_vit(method, trained, tmp_path):
    out = tmp_path / "self"
    if method_class(method).needs & {"optimizer_state"}:
        # mpe reads its posterior from the optimizer state, which a model.pt does not hold: refused, then
        # scored on a vit trained in the command
        msg = refused("influence", *DATA, *checkpoint(trained), "--method", method, "--self", "--out", out)
        assert "optimizer state" in msg and "train the model in this command" in msg
        source = [*NET, *TRAIN, "--epochs", "2"]
    else:
        source = checkpoint(trained)
    m = ok("influence", *DATA, *source, "--method", method, "--self", "--out", out)
    s = np.load(out / "self_influence.npy")
    assert s.shape == (N_TRAIN,) and np.isfinite(s).all() and np.ptp(s) > 0
    assert is_top(m["top_self_influence"], s)


def test_grad_dot_on_vit_is_the_gradient_inner_product(trained, data, tmp_path):
    """The definition, slowly: one example at a time through attention, LayerNorm and GELU."""
    out = tmp_path / "inf"
    ok("influence", *DATA, *checkpoint(trained), "--method", "grad-dot", "--n-test", N_TEST, "--out", out)
    module, _ = load_model(trained / "model.pt")
    params = list(module.parameters())

    def grads(x, y):
        rows = []
        for xi, yi in zip(x, y):
            loss = torch.nn.functional.cross_entropy(module(xi[None]), yi[None])
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    expected = grads(data.x_train, data.y_train) @ grads(data.x_test[:N_TEST], data.y_test[:N_TEST]).T
    np.testing.assert_allclose(np.load(out / "scores.npy"), expected.numpy(), rtol=1e-4, atol=1e-6)


VIT_MODULES = {"embed", "pos", "norm", "out"} | {
    f"blocks.{b}.{part}" for b in (0, 1) for part in ("ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc1", "mlp.fc2")
}


# grad-cos has no self-influence (cos(g_i, g_i) = 1: refused for every model)
@pytest.mark.parametrize("method, self_only", [(m, s) for m in by_module_names() for s in (False, True)
                                               if not (s and m == "grad-cos")])
def test_influence_by_module_on_vit_sums_to_the_total(method, self_only, trained, tmp_path):
    out = tmp_path / "inf"
    what = ["--self"] if self_only else ["--n-test", N_TEST]
    m = ok("influence", *DATA, *checkpoint(trained), "--method", method, *what, "--by-module", "--out", out)
    name = "self_influence" if self_only else "scores"
    total = np.load(out / f"{name}.npy")
    parts = np.load(out / f"{name}_by_module.npz")
    assert set(parts.files) == VIT_MODULES  # every parameter of every block, no silent skip
    assert sum(m["module_params"].values()) == 1474
    np.testing.assert_allclose(sum(parts[k] for k in parts.files), total, rtol=1e-4,
                               atol=1e-6 * np.abs(total).max())
    assert all(np.isfinite(parts[k]).all() for k in parts.files)


# --- the influence experiments ---------------------------------------------------------------------------
def test_noisy_labels_on_vit(tmp_path):
    """Trained in the command: a checkpoint holds clean labels, the experiment corrupts 20%."""
    out = tmp_path / "nl"
    methods = ["loss", "grad-dot", "if-ekfac"]
    m = ok("noisy-labels", *DATA, *NET, *TRAIN, "--epochs", "2", "--corruption-ratio", "0.2",
           "--methods", ",".join(methods), "--out", out)
    arrays = np.load(out / "self_influence.npz")
    assert arrays["corrupted"].shape == (12,) and m["n_corrupted"] == 12
    for method in methods:
        s = arrays[method.replace("-", "_")]
        assert s.shape == (N_TRAIN,) and np.isfinite(s).all()
        assert 0 <= m["auc"][method] <= 1 and 0 <= m["ap"][method] <= 1
    # `loss` is the trained model's loss on the (corrupted) training labels
    module, _ = load_model(out / "model.pt")
    d = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN, corruption_ratio=0.2))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(module(d.x_train), d.y_train, reduction="none")
    np.testing.assert_allclose(arrays["loss"], loss.numpy(), rtol=1e-5, atol=1e-6)


def test_prune_on_vit(trained, tmp_path):
    out = tmp_path / "prune"
    m = ok("prune", *DATA, *checkpoint(trained), "--methods", "loss", "--ks", "10,20", "--n-random", 1,
           "--out", out)
    masks = np.load(out / "prune_masks.npz")["masks"]  # kept examples: loss k = 10, 20, then random k = 10, 20
    assert masks.shape == (4, N_TRAIN) and (~masks).sum(1).tolist() == [10, 20, 10, 20]
    s = np.load(out / "self_influence.npz")["loss"]
    assert set(np.flatnonzero(~masks[0])) == set(np.argsort(s)[:10].tolist())  # the 10 lowest removed
    assert len(m["accuracy"]["loss"]) == 2 and all(0 <= a <= 1 for a in m["accuracy"]["loss"])


def test_relabel_on_vit(tmp_path):
    out = tmp_path / "relabel"
    m = ok("relabel", *DATA, *NET, *TRAIN, "--epochs", "2", "--corruption-ratio", "0.2", "--methods", "loss",
           "--budgets", "5", "--target", "other", "--n-random", 1, "--out", out)
    assert m["n_corrupted"] == 12 and 0 <= m["precision"]["loss"][0] <= 1
    assert all(0 <= a <= 1 for a in [*m["accuracy"]["loss"], m["none_accuracy"], m["clean_accuracy"]])


def test_lds_on_vit(trained, tmp_path):
    out = tmp_path / "lds"
    m = ok("lds", *DATA, *checkpoint(trained), "--methods", "grad-dot,if-ekfac", "--n-models", 3,
           "--n-test", 5, "--out", out)
    per_test = np.load(out / "lds_per_test.npz")
    for method in ("grad-dot", "if-ekfac"):
        rho = per_test[method.replace("-", "_")]
        assert rho.shape == (5,) and np.all(np.abs(rho) <= 1 + 1e-9)
        assert m["lds"][method] == pytest.approx(float(np.nanmean(rho)))
    (chunk,) = (out / "store").glob("*/chunks/*.npz")  # the engine retrained 3 vits
    assert np.load(chunk)["test_loss"].shape[0] == 3


def test_memorization_on_vit_through_the_engine(tmp_path):
    out = tmp_path / "mem"
    m = ok("memorization", *DATA, *NET, *TRAIN, "--epochs", "2", "--n-models", 4, "--chunk-size", 2,
           "--min-held-out", 1, "--out", out)
    mem = np.load(out / "memorization.npy")
    assert mem.shape == (N_TRAIN,) and m["n_models"] == 4
    defined = mem[~np.isnan(mem)]
    assert len(defined) == N_TRAIN - m["n_undefined"] and np.all(np.abs(defined) <= 1)
    assert m["mean_memorization"] == pytest.approx(float(defined.mean()))
    assert len(list((out / "store").glob("*/chunks/*.npz"))) == 2  # 4 models in chunks of 2


# --- curvature -------------------------------------------------------------------------------------------
def test_spectrum_on_vit_is_the_dense_ggns(trained, data, tmp_path):
    """The GGN (its dense matrix is 25x cheaper than the Hessian's here; perturb runs the Hessian)."""
    out = tmp_path / "spec"
    m = ok("spectrum", *DATA, *checkpoint(trained), "--matrix", "ggn", "--k", 3, "--trace-samples", 0,
           "--density-probes", 0, "--by-module", "--out", out)
    module, _ = load_model(trained / "model.pt")
    G = dense_matrix(FunctionalModel(module.double()), data.x_train.double(), data.y_train, "ggn")
    exact = torch.linalg.eigvalsh(G).flip(0).numpy()
    np.testing.assert_allclose(m["eigenvalues"], exact[:3], rtol=1e-3)
    # per module: the top eigenvalues of the diagonal blocks; a block's largest is at most the whole's
    parts = np.load(out / "spectrum_by_module.npz")
    assert {k for k in parts.files if ":" not in k} == VIT_MODULES
    model = FunctionalModel(module.double())
    for name in VIT_MODULES:
        idx = np.concatenate([np.arange(s.start, s.stop) for n, s in _slices(model) if n.startswith(name + ".")])
        block = torch.linalg.eigvalsh(G[idx][:, idx]).flip(0).numpy()
        k = min(3, len(idx))
        np.testing.assert_allclose(parts[name][:k], block[:k], rtol=1e-3, atol=1e-4 * exact[0], err_msg=name)
        assert parts[name][0] <= exact[0] * (1 + 1e-4)


def _slices(model: FunctionalModel):
    """(parameter name, slice of the flat vector), in the flattening order."""
    start = 0
    for name, p in model.params.items():
        yield name, slice(start, start + p.numel())
        start += p.numel()


def test_perturb_on_vit(trained, tmp_path):
    out = tmp_path / "perturb"
    m = ok("perturb", *DATA, *checkpoint(trained), "--k", 3, "--n-top", 2, "--n-bottom", 1, "--n-random", 1,
           "--n-points", 5, "--out", out)
    # along an eigenvector v (unit), the curvature vᵀHv is its eigenvalue
    np.testing.assert_allclose(m["curvature"][:2], m["eigenvalues"][:2], rtol=1e-3)
    arrays = np.load(out / "perturb.npz")
    assert arrays["train_loss"].shape == (4, 5) and np.isfinite(arrays["train_loss"]).all()
    train = json.loads((trained / "metrics.json").read_text())
    assert m["train_loss_at_0"] == pytest.approx(train["train_nll"], rel=1e-5)


@pytest.mark.parametrize("command", ["width-sweep", "grid"])
def test_effdim_sweeps_refuse_vit(command, tmp_path):
    """The sweeps vary the width (and depth) of mlp / cnn (/ resnet18); they do not build vits."""
    sizes = ["--widths", "4,8"] + (["--depths", "1"] if command == "grid" else [])
    msg = refused("effdim", command, *DATA, "--model", "vit", *sizes, "--epochs", 1, "--k", 2, "--out", tmp_path / "x")
    assert "received --model 'vit'" in msg and "mlp, cnn" in msg


# --- mpe -------------------------------------------------------------------------------------------------
MPE = ["--bs-jacs", "64"]


def test_mpe_validation_on_vit(trained, tmp_path):
    out = tmp_path / "mpe"
    m = ok("mpe", "validation", *MPE, *checkpoint(trained), "--n-retrain", 4, "--epochs-retrain", 1, "--out", out)
    sens = np.load(out / "sensitivities.npy")
    assert sens.shape == (N_TRAIN,) and np.isfinite(sens).all() and (sens >= 0).all()
    assert m["n_retrain"] == 4 and -1 <= m["spearman"] <= 1 and np.isfinite(m["pearson"])
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "vit"


def test_mpe_loco_on_vit(trained, tmp_path):
    out = tmp_path / "mpe"
    ok("mpe", "loco", *MPE, *checkpoint(trained), "--epochs-retrain", 1, "--out", out)
    loco = np.load(out / "loco.npz")
    assert loco["classes"].tolist() == list(range(10))
    assert np.isfinite(loco["estimated_nll"]).all() and np.isfinite(loco["true_test_nll"]).all()


@pytest.mark.parametrize("experiment, args, array, shape", [
    ("loo-iterations", [], "loo_iterations", {"estimated_nll": (2,), "test_nll": (2,)}),
    ("loo-l2reg", ["--n-exp", 2], "loo_l2reg", {"estimated_nll": (2,), "test_nll": (2,)}),
    ("evolving", ["--mc-samples", 4, "--n-bins", 4], "evolving", {"sensitivities": (2, N_TRAIN)}),
])
def test_mpe_experiments_that_train_on_vit(experiment, args, array, shape, tmp_path):
    """These follow the training itself (no --checkpoint): the vit of --width / --depth / --patch."""
    out = tmp_path / "mpe"
    ok("mpe", experiment, *MPE, *DATA, *NET, "--epochs", 2, *args, "--out", out)
    arrays = np.load(out / f"{array}.npz")
    for key, s in shape.items():
        assert arrays[key].shape == s and np.isfinite(arrays[key]).all(), key
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["name"], model["width"], model["depth"], model["patch"]) == ("vit", 8, 2, 4)


# --- representations: features of its blocks ------------------------------------------------------------
def test_zoo_of_vits_and_verify(trained, tmp_path):
    out = tmp_path / "zoo"
    m = ok("zoo", *DATA, *NET, *TRAIN, "--epochs", "2", "--n-models", 2, "--out", out)
    assert m["n_trained"] == 2 and all(0 <= a <= 1 for a in m["test_accuracy"])
    module, _ = load_model(out / "zoo" / "model_1.pt")
    assert isinstance(module, ViT)
    v = ok("verify", *DATA, "--checkpoint", out / "zoo" / "model_1.pt", "--expected-accuracy",
           m["test_accuracy"][1], "--tolerance", 1e-6, "--out", tmp_path / "verify")
    assert v["passed"] and v["accuracy"] == pytest.approx(m["test_accuracy"][1])


def test_verify_the_trained_vit(trained, tmp_path):
    expected = json.loads((trained / "metrics.json").read_text())["test_accuracy"]
    out = tmp_path / "verify"
    v = ok("verify", *DATA, *checkpoint(trained), "--expected-accuracy", expected, "--tolerance", 1e-6, "--out", out)
    assert v["passed"] and np.load(out / "correctness.npy").mean() == pytest.approx(expected)


def test_compare_a_vit_with_itself_block_by_block(trained, tmp_path):
    model = trained / "model.pt"
    msg = refused("compare", *DATA, "--model-a", model, "--model-b", model, "--out", tmp_path / "x")
    assert "no nn.ReLU module" in msg and "--layers" in msg and "blocks.0.mlp.act" in msg
    out = tmp_path / "cmp"
    m = ok("compare", *DATA, "--model-a", model, "--model-b", model, "--layers", f"{BLOCKS},norm", "--out", out)
    sim = np.load(out / "similarity.npy")
    assert m["layers"] == ["blocks.0", "blocks.1", "norm"] and sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-6)  # the same features: CKA 1
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)
    assert (sim < 1 - 1e-6)[~np.eye(3, dtype=bool)].all()  # different blocks: different features


def test_stitch_two_vits_after_each_block(trained, tmp_path):
    model = trained / "model.pt"
    msg = refused("stitch", *DATA, "--model-a", model, "--model-b", model, "--out", tmp_path / "x")
    assert "no nn.ReLU module" in msg and "--layers" in msg
    # a zoo to train: refused before any member is trained
    msg = refused("stitch", *DATA, *NET, *TRAIN, "--epochs", 2, "--out", tmp_path / "y")
    assert "model vit (ViT) has no nn.ReLU module" in msg
    out = tmp_path / "stitch"
    m = ok("stitch", *DATA, *NET, *TRAIN, "--epochs", 2, "--layers", BLOCKS, "--stitch-epochs", 1, "--out", out)
    assert m["layers"] == ["blocks.0", "blocks.1"] and len(m["clean_accuracy"]) == 2
    stitched, penalty = np.array(m["stitched_accuracy"]["linear"]), np.array(m["penalty"]["linear"])
    assert stitched.shape == (2,) and ((0 <= stitched) & (stitched <= 1)).all()
    np.testing.assert_allclose(penalty, m["mean_clean_accuracy"] - stitched, atol=1e-9)
    assert np.isfinite(m["final_loss"]["linear"]).all()


def test_probe_a_vit_block(trained, tmp_path):
    assert "no nn.ReLU module" in refused("probe", *DATA, *checkpoint(trained), "--out", tmp_path / "x")
    out = tmp_path / "probe"
    m = ok("probe", *DATA, *checkpoint(trained), "--layers", "blocks.0.mlp.act,blocks.1", "--repeats", 1,
           "--n-examples", 20, "--out", out)
    for layer in ("blocks.0.mlp.act", "blocks.1"):
        for transform, metrics in m["invariant"].items():
            for metric in metrics:  # at the transformed site, each metric's own invariances hold
                assert m["table"][layer][transform]["pre"][metric] == pytest.approx(1, abs=1e-5), (layer, metric)
            assert np.isfinite(m["output_change"][layer][transform])  # GELU, a block: not G_ReLU-equivariant


def test_stitching_a_vit_block_maps_its_width_at_every_token(trained, tmp_path):
    out = tmp_path / "stitch"
    model = trained / "model.pt"
    ok("stitch", *DATA, "--model-a", model, "--model-b", model, "--layers", "blocks.0", "--stitch-epochs", 1,
       "--out", out)
    weight = torch.load(out / "stitching_layers.pt")["linear/blocks.0"]["weight"]
    assert weight.shape == (8, 8)  # width x width, the same map at each of the 4 tokens
