"""End-to-end tests of `modelsense spectrum`, `perturb`, `effdim width-sweep`, `effdim grid`, `effdim blr` (tiny
settings)."""

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import modelsense.cli.curvature as cli_curvature  # noqa: F401  (registers spectrum / effdim)
import modelsense.experiments.curvature as exp
from modelsense.cli.app import app
from modelsense.core.functional import FunctionalModel
from modelsense.curvature import dense_hessian, fourier_features
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.models.checkpoint import load_model

runner = CliRunner()
N_TRAIN = 150
DATA = ["--dataset", "digits", "--n-train", str(N_TRAIN)]
TINY_SPECTRUM = [*DATA, "--model", "mlp", "--widths", "8", "--epochs", "2", "--lr", "0.1", "--bs", "32",
                 "--trace-samples", "4", "--density-probes", "2", "--density-steps", "8"]
TINY_SWEEP = [*DATA, "--epochs", "3", "--bs", "64", "--k", "3"]


def invoke(*args):
    return runner.invoke(app, [*map(str, args), "--quiet"])


def ok(*args) -> dict:
    res = invoke(*args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    out = args[list(args).index("--out") + 1]
    return json.loads((out / "metrics.json").read_text())


def error(res) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), f"{res.output}\n{res.exception!r}"
    return str(res.exception)


def cli_defaults(*command: str) -> dict:
    """Option name -> default of a command of the command line."""
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    return {p.name: p.default for p in cmd.params}


def neff(eigenvalues, s) -> float:
    lam = np.clip(np.asarray(eigenvalues, dtype=float), 0, None)
    return float((lam / (lam + s)).sum())


@pytest.fixture(scope="module")
def spectrum_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum")
    return out, ok("spectrum", *TINY_SPECTRUM, "--k", 4, "--s", "100,150", "--save-vectors", "--out", out)


# -- spectrum ----------------------------------------------------------------------------------


def test_spectrum_equals_dense_hessian_of_summed_loss(spectrum_run):
    out, m = spectrum_run
    assert m["n_params"] == 64 * 8 + 8 + 8 * 10 + 10 and m["matrix"] == "hessian" and m["reduction"] == "sum"
    module, info = load_model(out / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))
    fm = FunctionalModel(module.double())
    H = dense_hessian(fm, data.x_train.double(), data.y_train)  # of the summed loss
    top = torch.linalg.eigvalsh(H).flip(0)[:4].numpy()
    lam = np.asarray(m["eigenvalues"])
    assert np.all(np.diff(lam) <= 0) and all(m["eigenvalues_converged"])
    np.testing.assert_allclose(lam, top, rtol=1e-4)
    assert m["s"] == [100.0, 150.0]
    assert m["effective_dimension"] == pytest.approx(neff(lam, 100.0))
    assert m["effective_dimension_by_s"]["150.0"] == pytest.approx(neff(lam, 150.0))
    tr = float(torch.trace(H))
    assert abs(m["trace"] - tr) <= 4 * m["trace_standard_error"] + 1e-6 * abs(tr)
    arrays = np.load(out / "spectrum.npz")
    np.testing.assert_allclose(arrays["eigenvalues"], lam, rtol=1e-6)
    assert {"density_grid", "density", "slq_nodes", "slq_weights", "converged"} <= set(arrays.files)
    assert (out / "figures" / "spectrum.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["spectrum"]["k"] == 4
    vectors = np.load(out / "eigenvectors.npz")  # --save-vectors: the eigenvectors of these eigenvalues
    V = torch.as_tensor(vectors["eigenvectors"]).double()
    assert V.shape == (610, 4) and vectors["eigenvectors"].dtype == np.float32
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(H @ V, V * torch.as_tensor(lam), atol=1e-3 * lam[0], rtol=0)
    key = json.loads(str(vectors["key"]))
    assert key["n_params"] == 610 and key["matrix"] == "hessian" and not key["use_test"]
    assert key["n_examples"] == N_TRAIN and len(key["parameters_sha256"]) == 64
    assert m["use_test"] is False and m["n_examples"] == N_TRAIN


def test_spectrum_cost_per_part(spectrum_run):
    _, m = spectrum_run
    cost = m["cost"]
    assert list(cost) == ["training", "eigenvalues", "trace", "density"] and "matvecs" not in cost["training"]
    assert cost["trace"]["matvecs"] == 4 and cost["density"]["matvecs"] == 2 * 8
    assert cost["eigenvalues"]["matvecs"] + 4 + 2 * 8 == m["num_matvecs"]
    assert all(p["seconds"] >= 0 for p in cost.values()) and m["seconds"] >= cost["eigenvalues"]["seconds"]
    assert "train_seconds" not in m and "spectrum_seconds" not in m  # one timing key: seconds (+ seconds_total)


def test_spectrum_defaults_are_cheap_and_declared_once(spectrum_run, tmp_path):
    from modelsense.curvature import DEFAULT_S_SUM, SpectrumConfig

    cli = cli_defaults("spectrum")
    assert exp.SpectrumSpec().spectrum == SpectrumConfig()
    for name in (
        "k",
        "matrix",
        "reduction",
        "trace_samples",
        "density_probes",
        "density_steps",
        "lanczos_tol",
        "chunk_size",
    ):
        assert cli[name] == getattr(SpectrumConfig(), name), name
    assert cli["trace_samples"] == 0 and cli["density_probes"] == 0 and cli["s"] == ""
    help_text = runner.invoke(app, ["spectrum", "--help"], env={"COLUMNS": "400"}).output
    assert f"default {DEFAULT_S_SUM:g} for --reduction sum" in " ".join(help_text.split())
    out, _ = spectrum_run
    res = invoke("spectrum", *DATA, "--checkpoint", out / "model.pt", "--k", 3, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["trace"] is None and m["s"] == [DEFAULT_S_SUM] and list(m["cost"]) == ["eigenvalues"]
    assert m["num_matvecs"] == m["cost"]["eigenvalues"]["matvecs"]
    summary = " ".join(res.output.split())
    assert f"cost: eigenvalues {m['num_matvecs']} products" in summary
    assert "not computed: trace (--trace-samples N), density (--density-probes N)" in summary
    assert "density" not in np.load(tmp_path / "spectrum.npz").files


def test_spectrum_from_checkpoint_mean_reduction_scales_s(spectrum_run, tmp_path):
    """Mean-loss eigenvalues are the summed ones / N; the default s (100 / N) gives the same N_eff."""
    out, m_sum = spectrum_run
    m = ok("spectrum", *DATA, "--checkpoint", out / "model.pt", "--k", 4, "--reduction", "mean",
           "--trace-samples", 0, "--density-probes", 0, "--out", tmp_path)
    np.testing.assert_allclose(np.asarray(m["eigenvalues"]) * N_TRAIN, m_sum["eigenvalues"], rtol=1e-4)
    assert m["s"] == [pytest.approx(100.0 / N_TRAIN)]
    assert m["effective_dimension"] == pytest.approx(m_sum["effective_dimension"], rel=1e-4)
    assert m["trace"] is None and not (tmp_path / "model.pt").exists()
    assert m["train_accuracy"] == pytest.approx(m_sum["train_accuracy"])


def test_spectrum_weights_only(spectrum_run, tmp_path):
    out, _ = spectrum_run
    m = ok("spectrum", *DATA, "--checkpoint", out / "model.pt", "--k", 3, "--weights-only", "--matrix", "ggn",
           "--trace-samples", 0, "--density-probes", 0, "--out", tmp_path)
    module, _ = load_model(out / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))
    fm = FunctionalModel(module.double(), trainable=lambda n: n.endswith("weight"))
    from modelsense.curvature import dense_ggn

    top = torch.linalg.eigvalsh(dense_ggn(fm, data.x_train.double(), data.y_train)).flip(0)[:3].numpy()
    assert m["n_params"] == 64 * 8 + 8 * 10 and m["n_params_total"] == 610 and m["weights_only"]
    np.testing.assert_allclose(m["eigenvalues"], top, rtol=1e-4)


def test_spectrum_by_module_is_each_module_block_of_the_dense_hessian(spectrum_run, tmp_path):
    out, whole = spectrum_run
    m = ok("spectrum", *DATA, "--checkpoint", out / "model.pt", "--k", 3, "--by-module", "--trace-samples", 0,
           "--density-probes", 0, "--out", tmp_path)
    module, _ = load_model(out / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))
    fm = FunctionalModel(module.double())
    H = dense_hessian(fm, data.x_train.double(), data.y_train)
    assert list(m["by_module"]) == list(fm.spec.modules) == ["fc1", "out"]
    arrays = np.load(tmp_path / "spectrum_by_module.npz")
    for name, idx in fm.spec.modules.items():
        top = torch.linalg.eigvalsh(H[idx][:, idx]).flip(0)[:3].numpy()
        block = m["by_module"][name]
        assert block["n_params"] == len(idx)
        np.testing.assert_allclose(block["eigenvalues"], top, rtol=1e-4)
        np.testing.assert_allclose(arrays[name], top, rtol=1e-4)
        assert block["effective_dimension"] == pytest.approx(neff(block["eigenvalues"], m["s"][0]))
    np.testing.assert_allclose(m["eigenvalues"], whole["eigenvalues"][:3], rtol=1e-4)  # the whole matrix as before
    assert m["cost"]["by_module"]["matvecs"] > 0
    assert (tmp_path / "figures" / "spectrum_by_module.png").stat().st_size > 0


def test_spectrum_bad_input(spectrum_run, tmp_path):
    out, _ = spectrum_run
    msg = error(invoke("spectrum", *TINY_SPECTRUM, "--matrix", "fisher", "--out", tmp_path / "a"))
    assert "unknown matrix 'fisher'" in msg and "hessian" in msg
    msg = error(invoke("spectrum", *DATA, "--widths", "2", "--k", 500, "--out", tmp_path / "b"))
    assert "--k 500 is larger than the number of parameters" in msg and "(160)" in msg
    msg = error(invoke("spectrum", "--dataset", "mnist1d", "--n-train", 50, "--checkpoint", out / "model.pt",
                       "--out", tmp_path / "c"))
    assert "--dataset 'mnist1d' (the checkpoint's: 'digits')" in msg
    msg = error(invoke("spectrum", *DATA, "--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "d"))
    assert "not found" in msg
    msg = error(invoke("spectrum", *TINY_SPECTRUM, "--s", "100,-1", "--out", tmp_path / "e"))
    assert "s must be a finite number > 0" in msg
    msg = error(invoke("spectrum", *TINY_SPECTRUM, "--s", "1e2,abc", "--out", tmp_path / "f"))
    assert "--s must be comma-separated numbers" in msg
    msg = error(invoke("spectrum", *TINY_SPECTRUM, "--reduction", "median", "--out", tmp_path / "g"))
    assert "unknown reduction 'median'" in msg
    assert not (tmp_path / "b" / "config.json").exists()  # checked before anything is written


def test_spectrum_use_test_is_the_test_set_hessian(spectrum_run, tmp_path):
    out, _ = spectrum_run
    m = ok("spectrum", *DATA, "--checkpoint", out / "model.pt", "--k", 3, "--use-test", "--reduction", "mean",
           "--out", tmp_path)
    module, _ = load_model(out / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))
    H = dense_hessian(FunctionalModel(module.double()), data.x_test.double(), data.y_test) / data.n_test
    np.testing.assert_allclose(m["eigenvalues"], torch.linalg.eigvalsh(H).flip(0)[:3].numpy(), rtol=1e-4)
    assert m["use_test"] and m["n_examples"] == data.n_test == 500 and m["s"] == [pytest.approx(100.0 / 500)]


# -- perturb -----------------------------------------------------------------------------------


def test_perturb_from_saved_vectors_against_direct_evaluation(spectrum_run, tmp_path):
    out, spec_m = spectrum_run
    args = [*DATA, "--checkpoint", out / "model.pt", "--n-top", 2, "--n-bottom", 1, "--n-random", 2,
            "--t-max", 3, "--n-points", 5]
    m = ok("perturb", *args, "--vectors", out, "--out", tmp_path / "read")
    arrays = np.load(tmp_path / "read" / "perturb.npz")
    assert m["names"] == ["v1", "v2", "bottom 1", "random 1", "random 2"] and m["vectors"] == "read"
    np.testing.assert_allclose(arrays["t"], [-3, -1.5, 0, 1.5, 3], atol=1e-12)
    # the curvature along each eigenvector is its eigenvalue; t = 0 is the model itself
    np.testing.assert_allclose(m["curvature"][:2], spec_m["eigenvalues"][:2], rtol=1e-3)
    assert m["curvature_by_kind"]["top"] == m["curvature"][:2] and m["k"] == 4
    np.testing.assert_allclose(arrays["train_loss"][:, 2], spec_m["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(arrays["test_accuracy"][:, 2], spec_m["test_accuracy"])
    assert np.all(arrays["train_agreement"][:, 2] == 1)
    # the curve along v_1 is the loss of the network moved along the saved eigenvector
    module, _ = load_model(out / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN))
    v1 = torch.as_tensor(np.load(out / "eigenvectors.npz")["eigenvectors"][:, 0])
    theta = torch.nn.utils.parameters_to_vector(module.parameters())
    torch.nn.utils.vector_to_parameters(theta + 3 * v1, module.parameters())
    with torch.no_grad():
        direct = float(torch.nn.functional.cross_entropy(module(data.x_train), data.y_train))
    assert arrays["train_loss"][0, -1] == pytest.approx(direct, rel=1e-5)
    # the summary numbers are those of the curves
    rise = (arrays["train_loss"][:, 3:] + arrays["train_loss"][:, :2][:, ::-1]) / 2 - arrays["train_loss"][:, 2:3]
    rise = rise / arrays["train_loss"][0, 2]  # at t = 1.5, 3
    assert m["rise_at_t_max"]["top"] == pytest.approx(list(rise[:2, -1]))
    assert m["rise_at_t_max"]["random"] == pytest.approx(rise[3:, -1].mean())
    assert 1.5 < m["t_double"] < 3 and rise[0, 0] < 1 < rise[0, 1]  # v_1 doubles the loss between 1.5 and 3
    assert m["rise_at_t_double"]["top"][0] == pytest.approx(1.0)
    assert m["rise_at_t_double"]["random"] < 0.1 and m["rise_at_t_double"]["bottom"] < 0.1
    assert (tmp_path / "read" / "figures" / "perturb.png").stat().st_size > 0
    assert not (tmp_path / "read" / "model.pt").exists()
    # computing the eigenvectors here instead (same seed, same k) gives the same curves
    computed = ok("perturb", *args, "--k", 4, "--out", tmp_path / "computed")
    again = np.load(tmp_path / "computed" / "perturb.npz")
    assert computed["vectors"] == "computed"
    np.testing.assert_allclose(computed["curvature"], m["curvature"], rtol=1e-3)
    for a, b in zip(again["train_loss"][:2], arrays["train_loss"][:2]):  # an eigenvector's sign is arbitrary
        assert np.allclose(a, b, rtol=1e-4) or np.allclose(a, b[::-1], rtol=1e-4)


def test_perturb_bad_input(spectrum_run, tmp_path):
    out, _ = spectrum_run
    base = [*DATA, "--checkpoint", out / "model.pt", "--vectors", out]
    cases = [
        ([*DATA, "--widths", "8", "--epochs", 2, "--vectors", out], "needs the --checkpoint"),
        ([*base, "--weights-only"], "--weights-only True (the vectors': False)"),
        ([*base, "--use-test"], "--use-test True"),
        ([*base, "--n-top", 5], "--n-top 5 is more than the 4 eigenvectors in --vectors"),
        ([*base, "--n-points", 4], "--n-points must be odd"),
        ([*base, "--t-max", 0], "--t-max must be > 0, received 0.0"),
        ([*base, "--n-top", 0, "--n-bottom", 0, "--n-random", 0], "not all 0"),
        ([*DATA, "--checkpoint", out / "model.pt", "--vectors", tmp_path], "no eigenvectors.npz there"),
    ]
    for i, (args, words) in enumerate(cases):
        assert words in error(invoke("perturb", *args, "--out", tmp_path / f"bad{i}")), args
        assert not (tmp_path / f"bad{i}").exists()
    # vectors of another model: the parameters differ
    other = tmp_path / "other"
    ok("train", *DATA, "--widths", "8", "--epochs", 1, "--seed", 3, "--out", other)
    msg = error(invoke("perturb", *DATA, "--checkpoint", other / "model.pt", "--vectors", out, "--out", tmp_path / "x"))
    assert "computed at another model" in msg and not (tmp_path / "x").exists()


# -- width sweep -------------------------------------------------------------------------------


def test_width_sweep_end_to_end(tmp_path):
    m = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,6,4", "--s", "100,10",
           "--train-loss-threshold", 100, "--save-models", "--out", tmp_path)
    assert m["widths"] == [2, 4, 6] and m["n_params"] == [64 * w + w + 10 * w + 10 for w in (2, 4, 6)]
    assert m["s"] == [100.0, 10.0] and m["k"] == [3, 3, 3] and m["n_interpolating"] == 3
    for i, w in enumerate(m["widths"]):
        res = json.loads((tmp_path / "widths" / f"width_{w}.json").read_text())
        assert res["test_loss"] == m["test_loss"][i] and res["n_params"] == m["n_params"][i]
        assert m["effective_dimension"][i] == pytest.approx(neff(res["eigenvalues"], 100.0))
        assert m["effective_dimension_by_s"]["10.0"][i] == pytest.approx(neff(res["eigenvalues"], 10.0))
        assert m["test_error"][i] == pytest.approx(1 - res["test_accuracy"])
        assert (tmp_path / "widths" / f"model_{w}.pt").exists()
    from scipy.stats import spearmanr

    rho = spearmanr(m["effective_dimension"], m["test_loss"])[0]
    assert m["spearman_effdim_test_loss"] == pytest.approx(rho) == m["spearman_effdim_test_loss_all"]
    assert m["spearman_params_test_loss"] == pytest.approx(spearmanr(m["n_params"], m["test_loss"])[0])
    assert (tmp_path / "figures" / "width_sweep.png").stat().st_size > 0
    np.testing.assert_allclose(np.load(tmp_path / "width_sweep.npz")["test_loss"], m["test_loss"])


def count_trained(monkeypatch, crash_at: int | None = None) -> list[tuple]:
    """(the architecture's widths, the seeds) of every chunk the store trains; one crash at chunk `crash_at`."""
    import modelsense.retraining.store as store_module

    calls, real, crash = [], store_module.train_chunk, [crash_at]

    def counting(recipe, jobs, *args, **kw):
        calls.append((recipe.model.widths, tuple(j.seed for j in jobs)))
        if len(calls) == crash[0]:
            crash[0] = None
            raise RuntimeError("simulated crash")
        return real(recipe, jobs, *args, **kw)

    monkeypatch.setattr(store_module, "train_chunk", counting)
    return calls


def test_width_sweep_resume_skips_finished_widths(tmp_path, monkeypatch):
    calls = count_trained(monkeypatch, crash_at=2)
    res = invoke("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,4", "--out", tmp_path)
    assert isinstance(res.exception, RuntimeError)  # crash while training width 4: width 2 is kept
    assert (tmp_path / "widths" / "width_2.json").exists() and not (tmp_path / "widths" / "width_4.json").exists()
    calls.clear()
    msg = error(invoke("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,4", "--out", tmp_path))
    assert "--resume to continue it" in msg
    first = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,4", "--resume", "--out", tmp_path)
    assert calls == [((4,), (0,))] and first["n_trained"] == 1
    calls.clear()
    more = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,4,8", "--s", "50", "--resume", "--out", tmp_path)
    assert calls == [((8,), (0,))] and more["widths"] == [2, 4, 8]
    assert more["test_loss"][:2] == first["test_loss"] and more["s"] == [50.0]
    # a lost measurement is measured again from the stored model, which is not trained again
    stored = json.loads((tmp_path / "widths" / "width_4.json").read_text())
    (tmp_path / "widths" / "width_4.json").unlink()
    calls.clear()
    again = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,4,8", "--resume", "--out", tmp_path)
    assert calls == [] and again["n_trained"] == 1 and again["test_loss"] == more["test_loss"]
    assert json.loads((tmp_path / "widths" / "width_4.json").read_text())["eigenvalues"] == stored["eigenvalues"]
    msg = error(invoke("effdim", "width-sweep", *DATA, "--epochs", 4, "--bs", 64, "--k", 3, "--widths", "2",
                       "--resume", "--out", tmp_path))
    assert "train.epochs 4 (stored 3)" in msg


def test_width_sweep_and_grid_share_their_models_on_one_store(tmp_path, monkeypatch):
    calls = count_trained(monkeypatch)
    args = [*TINY_SWEEP, "--widths", "2,3", "--store", tmp_path / "store"]
    sweep_m = ok("effdim", "width-sweep", *args, "--out", tmp_path / "sweep")
    res = json.loads((tmp_path / "sweep" / "widths" / "width_3.json").read_text())
    assert calls == [((2,), (0,)), ((3,), (0,))] and not (tmp_path / "sweep" / "store").exists()
    assert (tmp_path / "store" / res["store"]["recipe"] / "recipe.json").exists()
    # the model it measured is the one on the store: its stored outputs give the losses
    from modelsense.retraining.store import GroundTruthStore, RetrainRecipe, jobs_from
    from modelsense.training.config import TrainConfig

    data_cfg = DataConfig("digits", n_train=N_TRAIN, corruption_ratio=0.2, standardize=True)
    train_cfg = TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=3, bs=64, delta=0.0)
    recipe = RetrainRecipe(data_cfg, exp.WidthSweepSpec().model.__class__("mlp", widths=(3,)), train_cfg, params=True)
    assert recipe.digest() == res["store"]["recipe"]
    tables = GroundTruthStore(tmp_path / "store", recipe, N_TRAIN, 500).gather(
        jobs_from(np.ones((1, N_TRAIN), dtype=bool), [0]))
    assert res["test_loss"] == pytest.approx(float(tables["test_loss"][0].mean()))
    # a grid of one depth on the same recipe and store trains nothing: its cells are the sweep's models
    calls.clear()
    grid = ok("effdim", "grid", *args, "--depths", "1", "--out", tmp_path / "grid")
    assert calls == [] and grid["n_trained"] == 2 and grid["test_loss"] == [sweep_m["test_loss"]]


@pytest.mark.slow
def test_width_sweep_on_ray_equals_local(tmp_path):
    pytest.importorskip("ray")
    local = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,3", "--out", tmp_path / "local")
    remote = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,3", "--backend", "ray", "--out", tmp_path / "ray")
    assert (tmp_path / "ray" / "store").is_dir()
    np.testing.assert_allclose(remote["test_loss"], local["test_loss"], rtol=1e-5)
    np.testing.assert_allclose(remote["effective_dimension"], local["effective_dimension"], rtol=1e-4)


def test_width_sweep_bad_input(tmp_path):
    msg = error(invoke("effdim", "width-sweep", *TINY_SWEEP, "--model", "lenet", "--out", tmp_path / "a"))
    assert "mlp, cnn, resnet18" in msg and "'lenet'" in msg
    msg = error(invoke("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2,0", "--out", tmp_path / "b"))
    assert "--widths must be >= 1, received 0 in (2, 0)" in msg
    msg = error(invoke("effdim", "width-sweep", *TINY_SWEEP, "--matrix", "fim", "--out", tmp_path / "c"))
    assert "unknown matrix 'fim'" in msg


@pytest.mark.parametrize("args", [
    ["--dataset", "mnist1d", "--n-train", "100", "--widths", "3,5"],
    ["--dataset", "digits", "--n-train", "100", "--model", "cnn", "--depth", "2", "--widths", "2,3"],
])
def test_width_sweep_other_datasets_and_models(args, tmp_path):
    m = ok("effdim", "width-sweep", *args, "--epochs", "2", "--k", "3", "--out", tmp_path)
    assert len(m["effective_dimension"]) == 2 and all(np.isfinite(m["test_loss"]))
    cfg = json.loads((tmp_path / "widths" / f"width_{m['widths'][1]}.json").read_text())["model"]
    assert (cfg["widths"] == [5]) if cfg["name"] == "mlp" else (cfg["width"] == 3 and cfg["depth"] == 2)


def test_width_sweep_defaults_are_the_prototype():
    from modelsense.curvature import resolve_s

    d = cli_defaults("effdim", "width-sweep")
    assert d["widths"] == "2,4,8,12,16,24,32,64,128,256,512" and d["model"] == "mlp" and d["hidden_layers"] == 1
    assert (d["optimizer"], d["lr"], d["lrmin"], d["epochs"], d["bs"], d["delta"]) == (
        "adam",
        3e-3,
        3e-3,
        400,
        128,
        0.0,
    )
    assert (d["dataset"], d["corruption_ratio"], d["standardize"]) == ("digits", 0.2, True)
    assert d["k"] == 50 and d["s"] == "" and d["matrix"] == "hessian" and d["reduction"] == "sum"
    assert "width" not in d and "trace_samples" not in d  # set by the sweep / not computed: not offered
    assert resolve_s((), "sum", 1297) == (100.0,) and resolve_s((), "mean", 1000) == (0.1,)


def test_summarize_counts_only_interpolating_models():
    results = [
        {
            "width": w,
            "n_params": p,
            "train_loss": tl,
            "train_accuracy": 1.0,
            "test_loss": te,
            "test_error": 0.1,
            "k": 2,
            "eigenvalues": ev,
            "eigenvalues_converged": [True, c],
        }
        for w, p, tl, te, ev, c in [
            (1, 10, 0.5, 3.0, [5.0, 1.0], True),
            (2, 20, 0.001, 2.0, [300.0, 100.0], True),
            (3, 30, 0.001, 1.0, [100.0, 50.0], False),
            (4, 40, 0.002, 1.5, [200.0, 60.0], True),
        ]
    ]
    from modelsense.curvature.effdim import width_sweep_summary

    m = width_sweep_summary(results, [100.0], 0.01)
    assert m["interpolating"] == [False, True, True, True] and m["n_interpolating"] == 3
    assert m["effective_dimension"][2] == pytest.approx(0.5)  # the unconverged Ritz value is dropped
    assert m["spearman_effdim_test_loss"] == pytest.approx(1.0)
    assert m["spearman_params_test_loss"] == pytest.approx(-0.5)
    assert width_sweep_summary(results[:2], [100.0], 0.01)["spearman_effdim_test_loss"] is None


def test_width_sweep_use_test(tmp_path):
    m = ok("effdim", "width-sweep", *TINY_SWEEP, "--widths", "2", "--use-test", "--save-models", "--out", tmp_path)
    res = json.loads((tmp_path / "widths" / "width_2.json").read_text())
    module, _ = load_model(tmp_path / "widths" / "model_2.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=N_TRAIN, corruption_ratio=0.2, standardize=True))
    H = dense_hessian(FunctionalModel(module.double()), data.x_test.double(), data.y_test)
    np.testing.assert_allclose(res["eigenvalues"], torch.linalg.eigvalsh(H).flip(0)[:3].numpy(), rtol=1e-4)
    assert m["use_test"] and res["use_test"]
    assert json.loads((tmp_path / "config.json").read_text())["sweep"]["use_test"] is True


# -- width x depth grid ------------------------------------------------------------------------
TINY_GRID = ["--dataset", "digits", "--n-train", "60", "--epochs", "2", "--bs", "32", "--k", "2"]


def mlp_params(width: int, depth: int) -> int:
    return 64 * width + width + (depth - 1) * (width * width + width) + 10 * width + 10


def test_grid_end_to_end(tmp_path):
    m = ok("effdim", "grid", *TINY_GRID, "--widths", "3,2", "--depths", "2,1", "--repeats", 2, "--s", "100,10",
           "--train-loss-threshold", 100, "--out", tmp_path)
    assert m["widths"] == [2, 3] and m["depths"] == [1, 2] and m["repeats"] == 2 and m["n_trained"] == 8
    assert m["n_params"] == [[mlp_params(w, d) for w in (2, 3)] for d in (1, 2)]
    for i, d in enumerate((1, 2)):
        for j, w in enumerate((2, 3)):
            runs = [json.loads((tmp_path / "cells" / f"depth_{d}_width_{w}_seed_{s}.json").read_text()) for s in (0, 1)]
            assert [r["model"]["widths"] for r in runs] == [[w] * d] * 2 and [r["seed"] for r in runs] == [0, 1]
            losses = [r["test_loss"] for r in runs]
            assert m["test_loss"][i][j] == pytest.approx(np.mean(losses))
            assert m["test_loss_std"][i][j] == pytest.approx(np.std(losses))
            assert m["test_loss_all"][i][j] == pytest.approx(losses)
            neffs = [neff(r["eigenvalues"], 100.0) for r in runs]
            assert m["effective_dimension"][i][j] == pytest.approx(np.mean(neffs))
            assert m["effective_dimension_by_s"]["10.0"][i][j] == pytest.approx(np.mean([neff(r["eigenvalues"], 10.0)
                                                                                        for r in runs]))
    assert runs[0]["test_loss"] != runs[1]["test_loss"]  # the seeds differ
    from scipy.stats import spearmanr

    assert m["n_interpolating"] == 4 and m["spearman_effdim_test_loss"] == pytest.approx(
        spearmanr(np.ravel(m["effective_dimension"]), np.ravel(m["test_loss"]))[0])
    arrays = np.load(tmp_path / "grid.npz")
    np.testing.assert_allclose(arrays["test_loss"], m["test_loss"])
    assert arrays["effective_dimension"].shape == (2, 2)
    for name in ("grid", "grid_profiles"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0


def test_grid_resumes_per_model(tmp_path, monkeypatch):
    calls = count_trained(monkeypatch, crash_at=3)
    grid = [*TINY_GRID, "--widths", "2,3", "--depths", "1,2"]
    res = invoke("effdim", "grid", *grid, "--out", tmp_path)
    assert isinstance(res.exception, RuntimeError)  # the third model crashed: two are kept
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    calls.clear()
    first = ok("effdim", "grid", *grid, "--resume", "--out", tmp_path)
    assert calls == [((2, 2), (0,)), ((3, 3), (0,))] and first["n_trained"] == 2
    calls.clear()
    more = ok("effdim", "grid", *TINY_GRID, "--widths", "2,3", "--depths", "1,2,3", "--repeats", 2, "--resume",
              "--out", tmp_path)
    # the seeds of one architecture are trained together (one chunk of the store)
    assert sorted(calls) == sorted([((2,), (1,)), ((3,), (1,)), ((2, 2), (1,)), ((3, 3), (1,)),
                                    ((2, 2, 2), (0, 1)), ((3, 3, 3), (0, 1))])
    assert more["test_loss_all"][0][0][0] == first["test_loss"][0][0]  # stored models are reused as they are
    msg = error(invoke("effdim", "grid", *grid, "--lr", 0.2, "--resume", "--out", tmp_path))
    assert "train.lr 0.2" in msg


def test_grid_bad_input(tmp_path):
    for i, (args, words) in enumerate([
        (["--model", "resnet18"], "mlp, cnn"),
        (["--depths", "0,1"], "--depths of an mlp (hidden layers) must be >= 1, received [0, 1]"),
        (["--widths", "2,2"], "--widths must be distinct"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--model", "cnn", "--depths", "-1"], "--depths must be >= 0, received -1 in (-1,)"),
    ]):
        assert words in error(invoke("effdim", "grid", *TINY_GRID, *args, "--out", tmp_path / str(i)))
        assert not (tmp_path / str(i)).exists()


def test_grid_of_cnns_and_the_spirals_recipe(tmp_path):
    m = ok("effdim", "grid", "--dataset", "digits", "--n-train", "40", "--model", "cnn", "--widths", "2",
           "--depths", "0,1", "--epochs", 1, "--k", 2, "--out", tmp_path / "cnn")
    cfg = json.loads((tmp_path / "cnn" / "cells" / "depth_1_width_2_seed_0.json").read_text())["model"]
    assert cfg["name"] == "cnn" and cfg["width"] == 2 and cfg["depth"] == 1 and len(m["test_loss"]) == 2
    # the two-spirals experiment of the README: small MLPs over width and depth on the generated spirals
    m = ok("effdim", "grid", "--dataset", "spirals", "--corruption-ratio", 0, "--n-train", 200, "--widths", "4,8",
           "--depths", "1,2", "--epochs", 2, "--k", 5, "--s", 50, "--out", tmp_path / "spirals")
    assert m["n_params"][0] == [2 * 4 + 4 + 4 * 2 + 2, 2 * 8 + 8 + 8 * 2 + 2]
    assert json.loads((tmp_path / "spirals" / "config.json").read_text())["dataset"]["name"] == "spirals"


# -- blr ---------------------------------------------------------------------------------------


def test_blr_end_to_end_against_closed_form(tmp_path):
    m = ok("effdim", "blr", "--n-points", 40, "--n-frequencies", 8, "--x-max", 5, "--s", 2, "--s-function", 0.05,
           "--out", tmp_path)
    phi = fourier_features(torch.linspace(0, 5, 40, dtype=torch.float64), 8)
    sigma = torch.linalg.inv(phi.T @ phi / 0.1 + torch.eye(16, dtype=torch.float64) / 3.0)  # all 40 points
    post = torch.linalg.eigvalsh(sigma)
    func = torch.linalg.eigvalsh(phi @ sigma @ phi.T).clamp_min(0)
    assert m["n_params"] == 16 and m["n_points"] == 40
    assert m["effdim_posterior_last"] == pytest.approx(float((post / (post + 2)).sum()), rel=1e-8)
    assert m["effdim_function_last"] == pytest.approx(float((func / (func + 0.05)).sum()), rel=1e-6)
    shrunk = 1 / (8 / 0.1 + 1 / 3)  # one point: |φ|² = F = 8 for every x; 15 directions keep the prior τ² = 3
    assert m["effdim_posterior_first"] == pytest.approx(15 * 3 / 5 + shrunk / (shrunk + 2), rel=1e-8)
    arrays = np.load(tmp_path / "blr.npz")
    assert arrays["effdim_posterior"].shape == (40,) and np.all(np.diff(arrays["effdim_posterior"]) <= 1e-12)
    assert (tmp_path / "figures" / "blr_effective_dimension.png").stat().st_size > 0
    msg = error(invoke("effdim", "blr", "--n-frequencies", 0, "--out", tmp_path / "x"))
    assert "--n-frequencies must be >= 1, received 0" in msg


def test_curvature_section(tmp_path):
    section = exp.curvature_section(tmp_path, progress=False)
    assert section.metrics["n_params"] == 26122 and all(p.exists() for p in section.figures)
    assert 0 < section.metrics["N_eff (s = N = 1297)"] <= section.metrics["N_eff (s = 100)"] <= 20
    assert len(section.figures) == 3 and section.metrics["t at which v_1 doubles the train loss"] > 0
