import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_farm
from modelsense.cli import app
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.memorization.estimators import subset_masks
from modelsense.models import ModelConfig
from modelsense.retraining.store import RetrainRecipe, subset_jobs, train_jobs
from modelsense.training import TrainConfig

RECIPE = RetrainRecipe(
    DataConfig("digits", n_train=120), ModelConfig("mlp", widths=(16,)), TrainConfig(epochs=2, bs=32)
)
runner = CliRunner()


def test_subset_jobs_are_the_original_sampling():
    ref = subset_masks(50, 0.7, 6, seed0=3, warn=False).masks
    jobs = subset_jobs(50, 0.7, [2, 4, 5], seed0=3)
    assert np.array_equal(np.stack([j.mask for j in jobs]), ref[[2, 4, 5]]) and [j.seed for j in jobs] == [5, 7, 8]
    assert subset_jobs(50, 0.7, [0])[0].mask.sum() == 35
    with pytest.raises(ConfigError, match="keeps 50 of 50"):
        subset_jobs(50, 1.0, [0])


@pytest.mark.slow
def test_ray_backend_equals_local(tmp_path):
    pytest.importorskip("ray")
    jobs = subset_jobs(120, 0.5, range(4))
    local = train_jobs(RECIPE, jobs, tmp_path / "local", chunk_models=2, progress=False)
    remote = train_jobs(RECIPE, jobs, tmp_path / "ray", chunk_models=2, backend="ray", ray_num_cpus=2, progress=False)
    assert np.array_equal(local["masks"], remote["masks"])
    assert np.array_equal(local["train_correct"], remote["train_correct"])
    assert np.array_equal(local["test_correct"], remote["test_correct"])
    np.testing.assert_allclose(local["test_loss"], remote["test_loss"], atol=1e-5)


def _cli(args, min_held_out=("--min-held-out", "1")):
    """The command on a tiny farm; 4-6 models are too few for the default minimum of 3 models per side."""
    return runner.invoke(
        app,
        [
            "memorization",
            "--dataset",
            "digits",
            "--n-train",
            "100",
            "--widths",
            "16",
            "--epochs",
            "2",
            "--bs",
            "32",
            "--quiet",
            *min_held_out,
            *args,
        ],
    )


def test_memorization_command_end_to_end_and_extend(tmp_path):
    out = tmp_path / "mem"
    res = _cli(["--n-models", "4", "--chunk-size", "2", "--corruption-ratio", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_models"] == 4 and "mean_memorization" in metrics and "n_high_memorization" in metrics
    assert 0.0 <= metrics["auc_corrupted"] <= 1.0
    for name in (
        "memorization.npy",
        "memorization_se.npy",
        "influence_top_indices.npy",
        "figures/memorization_histogram.png",
        "figures/most_memorized.png",
        "figures/memorization_convergence.png",
        "figures/influence_pairs.png",
    ):
        assert (out / name).exists(), name
    res = _cli(["--n-models", "6", "--chunk-size", "2", "--corruption-ratio", "0.1", "--out", str(out)])
    assert res.exit_code != 0 and "--resume" in str(res.exception)
    res = _cli(["--n-models", "6", "--chunk-size", "2", "--corruption-ratio", "0.1", "--resume", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["n_models"] == 6
    res = _cli(["--n-models", "6", "--corruption-ratio", "0.2", "--resume", "--out", str(out)])
    assert res.exit_code != 0 and "corruption_ratio" in str(res.exception)
    # the 6 models are jobs of the run's ground-truth store: an LDS at α = ρ on the same recipe reuses them
    chunks = list((out / "store").glob("*/chunks/*.npz"))
    assert sum(len(np.load(c)["keys"]) for c in chunks) == 6
    res = _cli(["--subset-ratio", "1.5", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "--subset-ratio must be < 1, received 1.5" in str(res.exception)
    res = _cli(["--n-models", "4", "--out", str(tmp_path / "few")], min_held_out=())  # default minimum 3
    assert isinstance(res.exception, ConfigError) and "--min-held-out 3 needs at least 6 models" in str(res.exception)
    assert not (tmp_path / "few").exists()  # refused before anything is written


def test_estimate_and_save_flags_examples_held_out_by_too_few_models(tmp_path, monkeypatch):
    """A synthetic farm: example 0 held out by 1 of 8 models, example 4 trained on by 2 (minimum 3)."""
    import torch

    from modelsense.data import Dataset
    from modelsense.experiments.memorization import estimate_and_save
    from modelsense.runs import RunDir

    masks, correct_train, correct_test = tiny_farm()  # model 0 gets everything wrong: raw mem(0) = infl(0, j) = 1
    gen = torch.Generator().manual_seed(0)
    data = Dataset("tiny", torch.rand(5, 1, 4, 4, generator=gen), torch.tensor([0, 1, 0, 1, 0]),
                   torch.rand(4, 1, 4, 4, generator=gen), torch.tensor([0, 1, 0, 1]), 2,
                   metadata={"corrupted_indices": [0, 2]})
    figures = {}
    with RunDir.open(tmp_path / "run", "memorization", {}) as run:
        monkeypatch.setattr(run, "save_figure", lambda fig, name: figures.setdefault(name, fig))
        metrics = estimate_and_save(run, masks, correct_train, correct_test, data=data, top_k=3)
    assert metrics["min_held_out"] == 3 and metrics["n_unreliable_train"] == 2
    assert metrics["n_unreliable_pairs"] == 2 * 4 and metrics["n_undefined"] == 0
    np.testing.assert_array_equal(np.load(run.path / "reliable.npy"), [False, True, True, True, False])
    mem = np.load(run.path / "memorization.npy")
    np.testing.assert_allclose(mem, [np.nan, -0.25, -0.25, 0.25, np.nan], equal_nan=True)
    np.testing.assert_array_equal(np.load(run.path / "influence_top_indices.npy"), [[3, 1, 2]] * 4)
    assert metrics["n_high_memorization"] == 1 and metrics["n_high_influence_pairs"] == 4  # example 3: 0.25
    assert metrics["mean_memorization"] == pytest.approx(-0.25 / 3)
    assert metrics["auc_corrupted"] == pytest.approx(0.25)  # examples 1-3 only: corrupted 2 ties 1, is below 3
    shown = [ax.get_title() for ax in figures["most_memorized"].axes if ax.get_title()]
    assert [t.split()[0] for t in shown] == ["#3", "#1", "#2"]  # never #0 (mem 1 from one model) or #4
    assert "2 without a reliable estimate left out" in figures["memorization_histogram"].axes[0].get_title()
    pairs = [ax.get_title() for ax in figures["influence_pairs"].axes]
    assert not any("1.00" in t for t in pairs) and any("0.25" in t for t in pairs)
    # the bare estimator (--min-held-out 1) puts example 0 first
    with RunDir.open(tmp_path / "bare", "memorization", {}) as run:
        bare = estimate_and_save(run, masks, correct_train, correct_test, data=None, top_k=3, min_held_out=1)
    assert bare["n_unreliable_train"] == 0
    assert np.load(tmp_path / "bare" / "influence_top_indices.npy")[:, 0].tolist() == [0, 0, 0, 0]


def test_memorization_from_original_runs(tmp_path):
    rng = np.random.default_rng(0)
    n, m = 12, 5
    root = tmp_path / "runs"
    for ratio in ("0.5", "0.7"):
        for r in range(4):
            idx = rng.permutation(n)
            k = int(float(ratio) * n)
            d = root / ratio / str(r)
            d.mkdir(parents=True)
            np.savez(
                d / "aux_arrays.npz",
                correctness_train=rng.random(k) < 0.9,
                correctness_removed=rng.random(n - k) < 0.5,
                correctness_test=rng.random(m) < 0.7,
                index_train=idx[:k],
                index_removed=idx[k:],
                index_test=np.arange(m),
                subsample_idx=idx[:k],
            )
    out = tmp_path / "est"
    res = runner.invoke(
        app, ["memorization", "--from-runs", str(root), "--out", str(out), "--quiet", "--min-held-out", "2"]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_models"] == 4 and metrics["subset_ratio"] == 0.7 and metrics["subset_ratios"] == [0.5, 0.7]
    assert (out / "consistency.npy").exists() and metrics["min_held_out"] == 2
    assert (out / "figures" / "consistency_curves.png").exists() and len(metrics["heldout_accuracy_by_ratio"]) == 2
    res = runner.invoke(app, ["memorization", "--from-runs", str(root), "--out", str(tmp_path / "few"), "--quiet"])
    assert isinstance(res.exception, ConfigError) and "needs at least 6 models" in str(res.exception)
    assert not (tmp_path / "few").exists()


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'modelsense\[distributed\]'"):
        train_jobs(RECIPE, subset_jobs(120, 0.5, range(2)), tmp_path / "r", backend="ray")


def test_lds_and_memorization_share_the_models_of_one_store(tmp_path):
    store = tmp_path / "shared_store"
    recipe = ["--dataset", "digits", "--n-train", "100", "--widths", "16", "--epochs", "2", "--bs", "32", "--lr", "0.1",
              "--delta", "1.0", "--quiet", "--store", str(store)]
    res = runner.invoke(
        app,
        [
            "memorization",
            *recipe,
            "--subset-ratio",
            "0.5",
            "--n-models",
            "4",
            "--min-held-out",
            "1",
            "--out",
            str(tmp_path / "mem"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "lds",
            *recipe,
            "--alpha",
            "0.5",
            "--n-models",
            "4",
            "--methods",
            "grad-dot",
            "--n-test",
            "5",
            "--out",
            str(tmp_path / "lds"),
        ],
    )
    assert res.exit_code == 0, (res.output, res.exception)
    log = (tmp_path / "lds" / "run.log").read_text()
    assert "4 of 4 jobs stored, 0 to train" in log  # the memorization run's models, reused
    assert not (tmp_path / "lds" / "store").exists()


def test_cscore_curves_over_ratios_share_the_store_with_single_ratio_runs(tmp_path):
    """--subset-ratios trains one farm per ratio in one store; a single-ratio run at a listed ratio (same
    recipe, same --store) reuses its models and finds the same held-out accuracies."""
    store = tmp_path / "store"
    multi = tmp_path / "multi"
    res = _cli(["--n-models", "4", "--subset-ratios", "0.7,0.3", "--corruption-ratio", "0.1", "--store", str(store),
                "--out", str(multi)])
    assert res.exit_code == 0, (res.output, res.exception)
    m = json.loads((multi / "metrics.json").read_text())
    assert m["subset_ratios"] == [0.3, 0.7] and m["subset_ratio"] == 0.7 and m["n_models"] == 4
    by_ratio = np.load(multi / "heldout_accuracy_by_ratio.npy")
    assert by_ratio.shape == (2, 100) and np.load(multi / "subset_ratios.npy").tolist() == [0.3, 0.7]
    held = ~np.isnan(by_ratio)  # the C-score: the mean over the ratios at which an example was held out
    expected = np.where(held.any(0), np.nansum(by_ratio, axis=0) / np.maximum(held.sum(0), 1), np.nan)
    np.testing.assert_allclose(np.load(multi / "consistency.npy"), expected, equal_nan=True)
    assert m["heldout_accuracy_by_ratio"] == pytest.approx(np.nanmean(by_ratio, axis=1).tolist())
    assert set(m["consistency_curves"]) >= {"corrupted vs clean labels: clean", "corrupted vs clean labels: corrupted"}
    assert 0.0 <= m["auc_corrupted_consistency"] <= 1.0 and (multi / "figures" / "consistency_curves.png").exists()
    for k, ratio in enumerate(("0.3", "0.7")):
        single = tmp_path / f"single_{ratio}"
        res = _cli(["--n-models", "4", "--subset-ratio", ratio, "--corruption-ratio", "0.1", "--store", str(store),
                    "--out", str(single)])
        assert res.exit_code == 0, (res.output, res.exception)
        assert "4 of 4 jobs stored, 0 to train" in (single / "run.log").read_text()
        np.testing.assert_array_equal(np.load(single / "heldout_accuracy.npy"), by_ratio[k])
    # memorization and influence are those of the ratio nearest --subset-ratio (0.7)
    np.testing.assert_array_equal(
        np.load(multi / "memorization.npy"), np.load(tmp_path / "single_0.7" / "memorization.npy")
    )


def test_cscore_ratios_are_nested_subsets_of_one_permutation_per_model():
    small, large = subset_jobs(50, 0.3, range(3), seed0=2), subset_jobs(50, 0.7, range(3), seed0=2)
    for a, b in zip(small, large):
        assert a.seed == b.seed and not (a.mask & ~b.mask).any() and a.mask.sum() == 15 and b.mask.sum() == 35


@pytest.mark.parametrize("args, message", [
    (["--subset-ratios", "0.5,1.0"], "--subset-ratios must be < 1, received 1.0"),
    (["--subset-ratios", "0.5,0.5"], "lists a ratio twice"),
    (["--subset-ratios", "0.5,x"], "comma-separated numbers"),
    (["--subset-ratios", "0.5", "--from-runs", "runs"], "give one of them"),
])
def test_cscore_bad_ratios_are_refused_before_writing(tmp_path, args, message):
    res = _cli(["--n-models", "4", *args, "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, ConfigError) and message in str(res.exception), (res.output, res.exception)
    assert not (tmp_path / "bad").exists()
