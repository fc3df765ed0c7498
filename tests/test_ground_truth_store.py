"""The one ground-truth store of retrained models (modelsense.retraining.store)."""

import sys
import types

import numpy as np
import pytest
import torch

from modelsense.data import DataConfig
from modelsense.errors import ConfigError, DataError
from modelsense.models import ModelConfig
from modelsense.retraining import store as store_module
from modelsense.retraining.store import (
    GroundTruthStore,
    Job,
    RetrainRecipe,
    job_parameters,
    jobs_from,
    params_digest,
    train_chunk,
    train_jobs,
)
from modelsense.training.config import TrainConfig

RECIPE = RetrainRecipe(DataConfig("digits", n_train=60), ModelConfig("mlp", widths=(8,)), TrainConfig(epochs=2, bs=16))


def _jobs(n: int = 5, seed: int = 0) -> list[Job]:
    rng = np.random.default_rng(seed)
    return jobs_from(rng.random((n, 60)) < 0.7, list(range(100, 100 + n)))


def _count_trained(monkeypatch) -> list[int]:
    trained: list[int] = []
    real = store_module.train_chunk

    def counting(recipe, jobs, *args, **kwargs):
        trained.append(len(jobs))
        return real(recipe, jobs, *args, **kwargs)

    monkeypatch.setattr(store_module, "train_chunk", counting)
    return trained


def test_a_job_does_not_depend_on_the_jobs_trained_beside_it():
    jobs = _jobs(4)
    whole = train_chunk(RECIPE, jobs)
    parts = [train_chunk(RECIPE, jobs[:1]), train_chunk(RECIPE, jobs[1:])]
    for name, table in whole.items():
        np.testing.assert_allclose(np.concatenate([p[name] for p in parts]), table, rtol=1e-4, atol=1e-5)


def test_stored_jobs_are_reused_in_any_order_and_only_missing_ones_trained(tmp_path, monkeypatch):
    trained = _count_trained(monkeypatch)
    jobs = _jobs(5)
    first = train_jobs(RECIPE, jobs, tmp_path, chunk_models=2, progress=False)
    assert trained == [2, 2, 1] and first["masks"].shape == (5, 60) and first["test_loss"].shape == (5, 500)
    np.testing.assert_array_equal(first["seeds"], [j.seed for j in jobs])
    again = train_jobs(RECIPE, jobs[::-1] + jobs[:1], tmp_path, progress=False)  # reordered, with a duplicate
    assert trained == [2, 2, 1]
    np.testing.assert_array_equal(again["test_loss"][:5], first["test_loss"][::-1])
    more = train_jobs(RECIPE, jobs + _jobs(2, seed=1), tmp_path, progress=False)  # extension: 2 new jobs
    assert trained == [2, 2, 1, 2] and len(more["seeds"]) == 7


def test_the_recipe_key_ignores_where_and_how_the_run_is_computed():
    moved = RetrainRecipe(DataConfig("digits", n_train=60, data_dir="/elsewhere"), RECIPE.model,
                          TrainConfig(epochs=2, bs=16, device="cpu", eval_every=5, seed=9))
    assert moved.digest() == RECIPE.digest()
    other = RetrainRecipe(RECIPE.data, RECIPE.model, TrainConfig(epochs=3, bs=16))
    assert other.digest() != RECIPE.digest()


def test_the_training_loss_is_in_the_key_only_when_it_is_not_the_default():
    """Stores written before `--loss` existed keep their digest; a sigmoid-trained recipe is another store."""
    assert "loss" not in RECIPE.key()["train"]
    sigmoid = RetrainRecipe(RECIPE.data, RECIPE.model, TrainConfig(epochs=2, bs=16, loss="sigmoid_bce"))
    assert sigmoid.key()["train"]["loss"] == "sigmoid_bce" and sigmoid.digest() != RECIPE.digest()


def test_relabeled_jobs_train_on_their_own_labels_and_are_stored_by_them(tmp_path, monkeypatch):
    from modelsense.data import load_dataset_from_config
    from modelsense.training import train_ensemble

    data = load_dataset_from_config(RECIPE.data)
    y = data.y_train.numpy()
    flipped = (y + 1) % 10
    mask = np.ones(60, dtype=bool)
    plain, relabeled = Job(mask, 3), Job(mask, 3, flipped)
    assert plain.key() == jobs_from(mask[None], [3])[0].key() == f"{plain.key().split('-')[0]}-60-3"  # unchanged
    assert relabeled.key() != plain.key() and Job(mask, 3, flipped.copy()).key() == relabeled.key()
    trained = _count_trained(monkeypatch)
    tables = train_jobs(RECIPE, [plain, relabeled], tmp_path, progress=False)
    assert trained == [2]
    ref = train_ensemble(lambda s: store_module.build_model_from_config(RECIPE.model, data.input_shape, 10, seed=s),
                         data.x_train, data.y_train, torch.ones(2, 60, dtype=torch.bool), RECIPE.train, seeds=[3, 3],
                         labels=torch.from_numpy(np.stack([y, flipped])), progress=False,
                         queries={"test": (data.x_test, data.y_test)})
    np.testing.assert_allclose(tables["test_loss"], ref.outputs["test"]["loss"].numpy(), rtol=1e-4, atol=1e-5)
    assert tables["test_correct"][1].mean() < tables["test_correct"][0].mean()  # every label wrong: worse
    again = train_jobs(RECIPE, [relabeled, Job(mask, 3, y)], tmp_path, progress=False)  # stored; y given = a new key
    assert trained == [2, 1]
    np.testing.assert_array_equal(again["test_loss"][0], tables["test_loss"][1])
    with pytest.raises(ConfigError, match="label rows"):
        jobs_from(mask[None], [3], [flipped[:10]])


def test_a_crash_loses_only_the_chunk_in_flight_and_damaged_chunks_are_trained_again(tmp_path, monkeypatch):
    jobs = _jobs(4)
    real = store_module.train_chunk
    calls = []

    def crash_on_second(recipe, chunk, *args, **kwargs):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(recipe, chunk, *args, **kwargs)

    monkeypatch.setattr(store_module, "train_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        train_jobs(RECIPE, jobs, tmp_path, chunk_models=2, progress=False)
    store = GroundTruthStore(tmp_path, RECIPE, 60, 500)
    assert len(store.missing(jobs)) == 2
    trained = _count_trained(monkeypatch)
    done = train_jobs(RECIPE, jobs, tmp_path, chunk_models=2, progress=False)
    assert trained == [2]
    chunk = store.chunk_files()[0]
    chunk.write_bytes(chunk.read_bytes()[:200])  # truncated
    again = train_jobs(RECIPE, jobs, tmp_path, chunk_models=2, progress=False)
    assert trained == [2, 2]
    np.testing.assert_allclose(again["test_loss"], done["test_loss"], rtol=1e-5)


def test_warm_starts_need_their_parameters():
    params = {"w": torch.ones(2)}
    recipe = RetrainRecipe(RECIPE.data, RECIPE.model, RECIPE.train, init=f"warm:{params_digest(params)}")
    with pytest.raises(ConfigError, match="initial parameters"):
        train_chunk(recipe, _jobs(1), init_params={"w": torch.zeros(2)})
    assert params_digest(params) != params_digest({"w": torch.zeros(2)})


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        train_jobs(RECIPE, _jobs(1), tmp_path, backend="slurm")
    with pytest.raises(ConfigError, match="batch plan"):
        RetrainRecipe(RECIPE.data, RECIPE.model, RECIPE.train, batch_plan="mixed")
    with pytest.raises(ConfigError, match="sgd, adam or adamw"):
        RetrainRecipe(RECIPE.data, RECIPE.model, TrainConfig(optimizer="ivon"))
    with pytest.raises(DataError, match="not in the store"):
        GroundTruthStore(tmp_path, RECIPE, 60, 500).gather(_jobs(1))


def test_a_recipe_that_keeps_parameters_stores_them_per_job_and_keeps_the_other_digests(tmp_path):
    """`params=True` (a zoo): each job's trained parameters come back by job, equal to training it alone;
    recipes without it keep the key (and the stores) they had."""
    assert "params" not in RECIPE.key()
    keeping = RetrainRecipe(RECIPE.data, RECIPE.model, RECIPE.train, params=True)
    assert keeping.digest() != RECIPE.digest()
    jobs = _jobs(3)
    tables = train_jobs(keeping, jobs, tmp_path, chunk_models=2, progress=False)
    alone = train_chunk(keeping, jobs[2:])
    for name, value in job_parameters(tables, 2).items():
        assert value.shape == alone[f"param.{name}"][0].shape
        torch.testing.assert_close(value, torch.from_numpy(alone[f"param.{name}"][0]), rtol=1e-4, atol=1e-5)
    assert set(job_parameters(tables, 0)) == {"fc1.weight", "fc1.bias", "out.weight", "out.bias"}
    with pytest.raises(DataError, match="no parameters"):
        job_parameters(train_jobs(RECIPE, jobs[:1], tmp_path, progress=False), 0)


def test_stored_parameters_are_the_models_and_come_back_in_any_job_order(tmp_path, monkeypatch):
    from modelsense.data import load_dataset_from_config
    from modelsense.models import build_model_from_config

    recipe = RetrainRecipe(RECIPE.data, RECIPE.model, RECIPE.train, params=True)
    trained = _count_trained(monkeypatch)
    jobs = _jobs(3)
    tables = train_jobs(recipe, jobs, tmp_path, chunk_models=2, progress=False)
    data = load_dataset_from_config(recipe.data)
    # loaded into the model, the parameters of a job predict the test losses stored for it
    module = build_model_from_config(recipe.model, data.input_shape, data.num_classes, seed=jobs[2].seed)
    module.load_state_dict(job_parameters(tables, 2), strict=False)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(module.eval()(data.x_test), data.y_test, reduction="none")
    np.testing.assert_allclose(tables["test_loss"][2], loss.numpy(), rtol=1e-4, atol=1e-5)
    again = train_jobs(recipe, jobs[::-1], tmp_path, progress=False)
    assert trained == [2, 1]  # the second call trains nothing
    for name, value in job_parameters(again, 0).items():
        torch.testing.assert_close(value, job_parameters(tables, 2)[name], rtol=0, atol=0)


class _FakeRay(types.ModuleType):
    """Ray's calls that `train_jobs` makes, run in this process, counting starts and stops."""

    def __init__(self):
        super().__init__("ray")
        self.inits, self.shutdowns, self.up = 0, 0, False
        self.exceptions = types.SimpleNamespace(RayError=RuntimeError)

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.inits, self.up = self.inits + 1, True

    def shutdown(self):
        self.shutdowns, self.up = self.shutdowns + 1, False

    def remote(self, fn):
        return types.SimpleNamespace(remote=fn)

    def put(self, value):
        return value

    def wait(self, pending, num_returns=1):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        return ref

    def cancel(self, ref, force=False):
        pass


def test_a_ray_session_starts_ray_once_for_several_retrainings_and_only_when_one_needs_it(tmp_path, monkeypatch):
    ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    other = RetrainRecipe(RECIPE.data, ModelConfig("mlp", widths=(4,)), RECIPE.train)  # a second architecture
    alone = train_jobs(RECIPE, _jobs(2), tmp_path / "alone", backend="ray", progress=False)
    assert (ray.inits, ray.shutdowns) == (1, 1)  # without a session: each retraining starts and stops Ray
    with store_module.ray_session():
        first = train_jobs(RECIPE, _jobs(2), tmp_path / "s", backend="ray", progress=False)
        train_jobs(other, _jobs(2), tmp_path / "s", backend="ray", progress=False)
        assert (ray.inits, ray.shutdowns, ray.up) == (2, 1, True)  # started once, kept running
    assert (ray.inits, ray.shutdowns, ray.up) == (2, 2, False)  # stopped when the session ends
    with store_module.ray_session():  # everything stored: Ray is not started at all
        train_jobs(RECIPE, _jobs(2), tmp_path / "s", backend="ray", progress=False)
    assert (ray.inits, ray.shutdowns) == (2, 2)
    for k in alone:
        np.testing.assert_allclose(first[k], alone[k], rtol=1e-5, atol=1e-6)
    ray.up = True  # a Ray the user started is left running
    with store_module.ray_session():
        train_jobs(RECIPE, _jobs(1, seed=5), tmp_path / "s", backend="ray", progress=False)
    assert (ray.inits, ray.shutdowns, ray.up) == (2, 2, True)
