import json

import numpy as np
import pytest
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.memorization.store import SubsetRunStore
from modelsense.models import ModelConfig
from modelsense.retraining import FarmSpec, model_masks, run_farm, train_chunk
from modelsense.retraining import farm as farm_module
from modelsense.training import TrainConfig
from modelsense.memorization.estimators import subset_masks

SPEC = FarmSpec(DataConfig("digits", n_train=120), ModelConfig("mlp", widths=(16,)), TrainConfig(epochs=2, bs=32), 0.5)
runner = CliRunner()


def test_masks_match_the_original_sampling():
    ref = subset_masks(50, 0.7, 6, seed0=3, warn=False).masks
    assert np.array_equal(model_masks(50, 0.7, [2, 4, 5], seed0=3), ref[[2, 4, 5]])
    assert model_masks(50, 0.7, [0], 0).sum() == 35


def test_chunk_results_do_not_depend_on_chunk_composition():
    whole = train_chunk(SPEC, [0, 1, 2, 3])
    parts = [train_chunk(SPEC, [0, 1]), train_chunk(SPEC, [2, 3])]
    for key in ("correct_train", "correct_test", "masks", "seeds"):
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    np.testing.assert_allclose(whole["loss_test"], np.concatenate([p["loss_test"] for p in parts]), atol=1e-5)


def test_resume_after_crash_and_extend(tmp_path, monkeypatch):
    calls = []
    real = farm_module.train_chunk

    def counting(spec, ids, data=None, progress=False):
        calls.append(list(ids))
        return real(spec, ids, data, progress)

    monkeypatch.setattr(farm_module, "train_chunk", counting)
    full = run_farm(SPEC, tmp_path / "a", 6, chunk_size=2, progress=False).load_all()
    assert calls == [[0, 1], [2, 3], [4, 5]]
    # simulate a crash: the last chunk lost, a half-written file left behind
    store = SubsetRunStore.open(tmp_path / "a")
    victim = store.chunk_path(np.array([4, 5]))
    victim.unlink()
    (store.chunk_dir / ".tmp-models-0000004-0000005.npz").write_bytes(b"half")
    calls.clear()
    resumed = run_farm(SPEC, tmp_path / "a", 6, chunk_size=2, progress=False).load_all()
    assert calls == [[4, 5]]
    assert np.array_equal(resumed.model_ids, np.arange(6))
    assert np.array_equal(resumed.correct_train, full.correct_train)
    assert not list(store.chunk_dir.glob(".tmp-*"))
    calls.clear()
    extended = run_farm(SPEC, tmp_path / "a", 9, chunk_size=2, progress=False).load_all()
    assert calls == [[6, 7], [8]] and len(extended.model_ids) == 9
    assert np.array_equal(extended.correct_train[:6], full.correct_train)


def test_farm_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        FarmSpec(SPEC.data, SPEC.model, SPEC.train, subset_ratio=1.0)
    with pytest.raises(ConfigError, match="n-models must be >= 2"):
        run_farm(SPEC, tmp_path / "x", 1)
    with pytest.raises(ConfigError, match="unknown backend"):
        run_farm(SPEC, tmp_path / "x", 4, backend="slurm")


@pytest.mark.slow
def test_ray_backend_equals_local(tmp_path):
    pytest.importorskip("ray")
    local = run_farm(SPEC, tmp_path / "local", 4, chunk_size=2, progress=False).load_all()
    remote = run_farm(SPEC, tmp_path / "ray", 4, chunk_size=2, backend="ray", ray_num_cpus=2, progress=False).load_all()
    assert np.array_equal(local.masks, remote.masks)
    assert np.array_equal(local.correct_train, remote.correct_train)
    assert np.array_equal(local.correct_test, remote.correct_test)
    np.testing.assert_allclose(local.loss_test, remote.loss_test, atol=1e-5)


def _cli(args):
    return runner.invoke(app, ["memorization", "--dataset", "digits", "--n-train", "100", "--widths", "16", "--epochs", "2",
                               "--bs", "32", "--quiet", *args])


def test_memorization_command_end_to_end_and_extend(tmp_path):
    out = tmp_path / "mem"
    res = _cli(["--n-models", "4", "--chunk-size", "2", "--corruption-ratio", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_models"] == 4 and "mean_memorization" in metrics and "n_high_memorization" in metrics
    assert 0.0 <= metrics["auc_corrupted"] <= 1.0
    for name in ("memorization.npy", "memorization_se.npy", "influence_top_indices.npy", "figures/memorization_histogram.png",
                 "figures/most_memorized.png", "figures/memorization_convergence.png", "figures/influence_pairs.png"):
        assert (out / name).exists(), name
    res = _cli(["--n-models", "6", "--chunk-size", "2", "--corruption-ratio", "0.1", "--out", str(out)])
    assert res.exit_code != 0 and "--resume" in str(res.exception)
    res = _cli(["--n-models", "6", "--chunk-size", "2", "--corruption-ratio", "0.1", "--resume", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["n_models"] == 6
    res = _cli(["--n-models", "6", "--corruption-ratio", "0.2", "--resume", "--out", str(out)])
    assert res.exit_code != 0 and "corruption_ratio" in str(res.exception)
    res = _cli(["--subset-ratio", "1.5", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "strictly between 0 and 1" in str(res.exception)


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
            np.savez(d / "aux_arrays.npz", correctness_train=rng.random(k) < 0.9, correctness_removed=rng.random(n - k) < 0.5,
                     correctness_test=rng.random(m) < 0.7, index_train=idx[:k], index_removed=idx[k:],
                     index_test=np.arange(m), subsample_idx=idx[:k])
    out = tmp_path / "est"
    res = runner.invoke(app, ["memorization", "--from-runs", str(root), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_models"] == 4 and metrics["subset_ratio"] == 0.7 and metrics["subset_ratios"] == [0.5, 0.7]
    assert (out / "consistency.npy").exists()


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'modelsense\[distributed\]'"):
        run_farm(SPEC, tmp_path / "r", 2, backend="ray")
