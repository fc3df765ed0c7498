"""End-to-end tests of `modelsense zoo`, `compare`, `stitch`, `probe` (tiny digits MLPs) and their experiments."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import modelsense.cli.representations  # noqa: F401  (registers zoo / compare / stitch)
from modelsense.cli.app import app
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.experiments.train import train_model
from modelsense.models import ModelConfig, build_model
from modelsense.models.checkpoint import load_model, save_model
from modelsense.retraining.zoo import train_zoo, zoo_member_path
from modelsense.training.config import TrainConfig

runner = CliRunner()
# a tiny setting shared by the tests: 150 digits, MLP 64-16-16-10, 3 epochs
DATA = ["--dataset", "digits", "--n-train", "150"]
MODEL = ["--model", "mlp", "--widths", "16,16"]
TRAIN = ["--epochs", "3", "--lr", "0.1", "--bs", "32"]
TINY = DATA + MODEL + TRAIN


def invoke(*args):
    res = runner.invoke(app, [*map(str, args), "--quiet"])
    return res


def ok(*args) -> dict:
    res = invoke(*args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    out = args[list(args).index("--out") + 1]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """A zoo of seeds 0, 1 trained by the command (the vmapped engine)."""
    root = tmp_path_factory.mktemp("zoo")
    metrics = ok("zoo", *TINY, "--n-models", "2", "--out", root)
    assert metrics["seeds"] == [0, 1] and metrics["method"] == "ensemble" and metrics["n_trained"] == 2
    return root


# -- zoo -------------------------------------------------------------------------------------------


def test_zoo_engine_members_equal_models_trained_one_by_one(zoo_dir):
    """Members trained at once by the engine equal `train_model` (fit) with the same seed."""
    index = json.loads((zoo_dir / "zoo" / "zoo.json").read_text())
    from modelsense.data import load_dataset_from_config

    data = load_dataset_from_config(DataConfig("digits", n_train=150))
    for seed in (0, 1):
        module, info = load_model(zoo_member_path(zoo_dir, seed))
        assert info["seed"] == seed and info["dataset"] == "digits"
        ref, _ = train_model(data, ModelConfig("mlp", widths=(16, 16)),
                             TrainConfig(epochs=3, lr=0.1, bs=32, seed=seed, eval_every=0), progress=False)
        for (k, v), (k_ref, v_ref) in zip(module.state_dict().items(), ref.state_dict().items()):
            assert k == k_ref
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            acc = (module(data.x_test).argmax(1) == data.y_test).float().mean().item()
        assert index["members"][str(seed)]["test_accuracy"] == pytest.approx(acc)
    metrics = json.loads((zoo_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == [index["members"][s]["test_accuracy"] for s in ("0", "1")]


def test_zoo_reuses_members_and_refuses_other_settings(zoo_dir, tmp_path):
    # same settings: nothing is retrained; seed 2 is added
    res = train_zoo(DataConfig("digits", n_train=150), ModelConfig("mlp", widths=(16, 16)),
                    TrainConfig(epochs=3, lr=0.1, bs=32), None, tmp_path, seeds=[0], progress=False)
    assert res.trained == [0]
    again = train_zoo(DataConfig("digits", n_train=150), ModelConfig("mlp", widths=(16, 16)),
                      TrainConfig(epochs=3, lr=0.1, bs=32), None, tmp_path, seeds=[0, 2], progress=False)
    assert again.trained == [2] and again.seeds == [0, 2] and again.test_accuracy[0] == res.test_accuracy[0]
    with pytest.raises(ConfigError, match="was trained with train settings"):
        train_zoo(DataConfig("digits", n_train=150), ModelConfig("mlp", widths=(16, 16)),
                  TrainConfig(epochs=4, lr=0.1, bs=32), None, tmp_path, seeds=[0], progress=False)


def test_zoo_resume_adds_members_of_other_seeds_and_refuses_other_settings(tmp_path):
    first = ok("zoo", *TINY, "--n-models", "1", "--out", tmp_path)
    more = ok("zoo", *TINY, "--n-models", "1", "--seed", "1", "--resume", "--out", tmp_path)  # the seed is no setting
    assert first["seeds"] == [0] and more["seeds"] == [1] and more["n_trained"] == 1
    assert sorted(json.loads((tmp_path / "zoo" / "zoo.json").read_text())["members"]) == ["0", "1"]
    res = invoke("zoo", *DATA, *MODEL, "--epochs", "4", "--lr", "0.1", "--bs", "32", "--resume", "--out", tmp_path)
    assert isinstance(res.exception, ConfigError) and "zoo.train.epochs 4 (stored 3)" in str(res.exception)


def test_zoo_members_are_jobs_of_the_ground_truth_store(zoo_dir, tmp_path):
    """The engine's members are jobs (all examples, seed) of the store, kept with their parameters: a zoo
    in another folder on the same --store trains nothing and writes the same checkpoints."""
    from modelsense.retraining.store import GroundTruthStore, Job, RetrainRecipe, job_parameters

    seeds = []  # other tests may grow this zoo (e.g. stitch --zoo-size 3): its chunks hold seeds 0, 1 and any more
    for chunk in (zoo_dir / "store").glob("*/chunks/*.npz"):
        with np.load(chunk) as f:
            assert f["masks"].all() and "param.fc1.weight" in f.files
            seeds += f["seeds"].tolist()
            n_test = f["test_correct"].shape[1]
    assert {0, 1} <= set(seeds) and len(seeds) == len(set(seeds))
    recipe = RetrainRecipe(DataConfig("digits", n_train=150), ModelConfig("mlp", widths=(16, 16)),
                           TrainConfig(epochs=3, lr=0.1, bs=32), params=True)
    tables = GroundTruthStore(zoo_dir / "store", recipe, 150, n_test).gather([Job(np.ones(150, dtype=bool), 1)])
    torch.testing.assert_close(job_parameters(tables, 0)["fc1.weight"],
                               load_model(zoo_member_path(zoo_dir, 1))[0].state_dict()["fc1.weight"], atol=0, rtol=0)
    m = ok("zoo", *TINY, "--n-models", "2", "--store", zoo_dir / "store", "--out", tmp_path / "again")
    first = json.loads((zoo_dir / "metrics.json").read_text())
    assert m["n_trained"] == 0 and m["method"] == "ensemble" and m["test_accuracy"] == first["test_accuracy"]
    assert not (tmp_path / "again" / "store").exists()
    for seed in (0, 1):
        for k, v in load_model(zoo_member_path(tmp_path / "again", seed))[0].state_dict().items():
            assert torch.equal(v, load_model(zoo_member_path(zoo_dir, seed))[0].state_dict()[k])


def test_zoo_on_ray_equals_the_local_zoo(zoo_dir, tmp_path):
    pytest.importorskip("ray")
    from modelsense.retraining.store import RetrainOptions

    res = train_zoo(DataConfig("digits", n_train=150), ModelConfig("mlp", widths=(16, 16)),
                    TrainConfig(epochs=3, lr=0.1, bs=32), 2, tmp_path, progress=False,
                    retrain=RetrainOptions(backend="ray", chunk_size=1))
    assert res.trained == [0, 1] and len(list((tmp_path / "store").glob("*/chunks/*.npz"))) == 2
    for seed in (0, 1):
        ray_state = load_model(zoo_member_path(tmp_path, seed))[0].state_dict()
        for k, v in load_model(zoo_member_path(zoo_dir, seed))[0].state_dict().items():
            torch.testing.assert_close(ray_state[k], v, atol=1e-6, rtol=1e-6)


def test_zoo_on_ray_needs_the_engine(tmp_path):
    res = invoke("zoo", *DATA, "--model", "cnn", "--width", 2, "--depth", 1, "--norm", "bn", "--epochs", 1,
                 "--backend", "ray", "--out", tmp_path / "x")
    assert "use --backend local" in _error(res) and not (tmp_path / "x").exists()


def test_zoo_trains_batch_norm_models_one_by_one(tmp_path):
    res = train_zoo(DataConfig("digits", n_train=100), ModelConfig("cnn", width=2, depth=1, norm="bn"),
                    TrainConfig(epochs=1, lr=0.05, bs=50), 2, tmp_path, progress=False)
    assert res.method == "fit" and res.seeds == [0, 1] and all(p.exists() for p in res.paths)
    with pytest.raises(ConfigError, match="batch norm"):
        train_zoo(DataConfig("digits", n_train=100), ModelConfig("cnn", width=2, depth=1, norm="bn"),
                  TrainConfig(epochs=1, lr=0.05, bs=50), None, tmp_path, seeds=[5], method="ensemble", progress=False)


# -- compare ---------------------------------------------------------------------------------------


def test_compare_two_seeds_writes_matrix_and_heatmap(zoo_dir, tmp_path):
    out = tmp_path / "cmp"
    m = ok("compare", *TINY, "--seed-a", 0, "--seed-b", 1, "--metric", "cka", "--zoo", zoo_dir, "--out", out)
    matrix = np.asarray(m["matrix"])
    assert m["layers"] == ["act1", "act2"] and "layers_b" not in m and matrix.shape == (2, 2)
    assert m["diagonal"] == pytest.approx(np.diag(matrix).tolist())
    assert np.all((matrix > 0) & (matrix <= 1 + 1e-9)) and m["value"] == "similarity"
    np.testing.assert_allclose(np.load(out / "similarity.npy"), matrix)
    assert (out / "figures" / "similarity_cka.png").stat().st_size > 1000
    assert not (out / "zoo").exists()  # members came from --zoo, nothing retrained


@pytest.mark.parametrize("metric", ["cka", "unbiased-cka", "procrustes", "relu-procrustes", "relu-cka"])
def test_compare_model_with_itself_has_unit_diagonal(zoo_dir, tmp_path, metric):
    path = zoo_member_path(zoo_dir, 0)
    out = tmp_path / metric
    m = ok("compare", *DATA, "--model-a", path, "--model-b", path, "--metric", metric, "--n-examples", 80, "--out", out)
    assert m["n_examples"] == 80
    assert m["diagonal"] == pytest.approx([1.0, 1.0], abs=1e-6)
    if metric.endswith("procrustes"):
        assert m["diagonal_distance"] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_compare_explains_relu_cka_next_to_linear_cka(zoo_dir, tmp_path):
    res = invoke("compare", *TINY, "--metric", "relu-cka", "--zoo", zoo_dir, "--out", tmp_path / "relu")
    assert res.exit_code == 0 and "invariant only to permuting and positively rescaling channels" in " ".join(
        res.output.split()
    )
    res = invoke("compare", *TINY, "--metric", "cka", "--zoo", zoo_dir, "--out", tmp_path / "cka")
    assert res.exit_code == 0 and "invariant only" not in res.output


def _permuted_rescaled_copy(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same function: hidden units of fc1 permuted by P and scaled by D > 0 (a G_ReLU symmetry)."""
    g = torch.Generator().manual_seed(seed)
    copy = build_model("mlp", (1, 8, 8), 10, widths=(16, 16), seed=0)
    copy.load_state_dict(module.state_dict())
    perm = torch.randperm(16, generator=g)
    scale = torch.exp(torch.randn(16, generator=g))
    with torch.no_grad():
        copy.fc1.weight.copy_(module.fc1.weight[perm] * scale[:, None])
        copy.fc1.bias.copy_(module.fc1.bias[perm] * scale)
        copy.fc2.weight.copy_(module.fc2.weight[:, perm] / scale[None, :])
    return copy


def test_relu_symmetric_copy_is_identical_for_relu_metrics_and_permutation_stitching(zoo_dir, tmp_path):
    module, _ = load_model(zoo_member_path(zoo_dir, 0))
    copy = _permuted_rescaled_copy(module)
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), module(x), atol=1e-5, rtol=1e-5)
    path = tmp_path / "copy.pt"
    save_model(path, copy, ModelConfig("mlp", widths=(16, 16)), SimpleNamespace(input_shape=(1, 8, 8), num_classes=10,
                                                                                name="digits"), 0)
    a = zoo_member_path(zoo_dir, 0)
    for metric in ("relu-procrustes", "relu-cka"):
        m = ok("compare", *DATA, "--model-a", a, "--model-b", path, "--metric", metric, "--out", tmp_path / metric)
        assert m["diagonal"] == pytest.approx([1.0, 1.0], abs=1e-6)
    # linear CKA is not invariant to per-unit scaling: the permuted layer is not identical for it
    m = ok("compare", *DATA, "--model-a", a, "--model-b", path, "--metric", "cka", "--out", tmp_path / "cka")
    assert m["diagonal"][0] < 1 - 1e-3 and m["diagonal"][1] == pytest.approx(1.0, abs=1e-6)
    # permutation stitching initialised from the activations recovers P D exactly: no penalty
    m = ok("stitch", *DATA, "--model-a", a, "--model-b", path, "--kind", "permutation", "--init", "match",
           "--stitch-epochs", 0, "--layers", "act1", "--out", tmp_path / "stitch")
    assert m["stitched_accuracy"] == {"permutation": [pytest.approx(m["clean_accuracy"][0])]}
    assert m["penalty"] == {"permutation": [pytest.approx(0.0)]}
    perm = m["extra"]["permutation"][0]["permutation"]
    assert sorted(perm) == list(range(16))


# -- stitch ----------------------------------------------------------------------------------------


def test_stitch_two_seeds_several_kinds(zoo_dir, tmp_path):
    out = tmp_path / "st"
    m = ok("stitch", *TINY, "--kind", "linear,permutation", "--stitch-epochs", 2, "--stitch-lr", 0.01,
           "--zoo", zoo_dir, "--out", out)
    assert m["layers"] == ["act1", "act2"] and m["kinds"] == ["linear", "permutation"]
    assert set(m["stitched_accuracy"]) == {"linear", "permutation"}
    clean = m["clean_accuracy"]
    for kind in m["kinds"]:
        acc, pen = m["stitched_accuracy"][kind], m["penalty"][kind]
        assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
        assert pen == pytest.approx([np.mean(clean) - a for a in acc])
        assert m["mean_penalty"][kind] == pytest.approx(np.mean(pen)) and len(m["layer_seconds"][kind]) == 2
    assert (out / "figures" / "stitching_penalty.png").stat().st_size > 1000
    arrays = np.load(out / "stitching.npz")
    assert arrays["penalty"].shape == (1, 2, 2) and arrays["clean_accuracy"].shape == (1, 2)
    np.testing.assert_array_equal(arrays["pairs"], [[0, 1]])
    states = torch.load(out / "stitching_layers.pt")
    assert set(states) == {"linear/act1", "linear/act2", "permutation/act1", "permutation/act2"}


def test_stitch_single_kind_trains_missing_zoo_members(tmp_path):
    out = tmp_path / "st"
    m = ok("stitch", *TINY, "--kind", "lowrank", "--rank", 2, "--layers", "act2", "--stitch-epochs", 1,
           "--seed-a", 3, "--seed-b", 4, "--out", out)
    # one kind: the same shape as several, kind -> list over layers
    assert m["layers"] == ["act2"] and list(m["stitched_accuracy"]) == list(m["penalty"]) == ["lowrank"]
    assert len(m["stitched_accuracy"]["lowrank"]) == len(m["penalty"]["lowrank"]) == 1
    assert zoo_member_path(out, 3).exists() and zoo_member_path(out, 4).exists()


def test_compare_resumes_from_the_store_of_the_members_it_trained(tmp_path):
    """compare trains its zoo members as store jobs in the run; --resume keeps zoo/ and store/, so members whose
    checkpoints were lost are taken from the store, not trained again."""
    out = tmp_path / "cmp"
    first = ok("compare", *TINY, "--seed-a", 3, "--seed-b", 4, "--out", out)
    assert len(list((out / "store").glob("*/chunks/*.npz"))) == 1
    import shutil

    shutil.rmtree(out / "zoo")
    again = ok("compare", *TINY, "--seed-a", 3, "--seed-b", 4, "--resume", "--out", out)
    assert "2 of 2 jobs stored, 0 to train" in (out / "run.log").read_text()
    np.testing.assert_allclose(again["matrix"], first["matrix"], atol=1e-9)
    msg = _error(invoke("compare", *DATA, "--model", "cnn", "--width", 2, "--depth", 1, "--norm", "bn",
                        "--backend", "ray", "--out", tmp_path / "x"))
    assert "use --backend local" in msg and not (tmp_path / "x").exists()


def test_stitch_over_random_zoo_pairs_reports_mean_and_standard_deviation(zoo_dir, tmp_path):
    """--repeats 2 draws 2 of the 3 pairs of the zoo seeds 0, 1, 2 (seed 2 trained into --zoo); the means and
    standard deviations are those of the pairs' own stitching runs."""
    out = tmp_path / "rep"
    m = ok("stitch", *TINY, "--kind", "linear,permutation", "--stitch-epochs", 1, "--stitch-lr", 0.01, "--repeats", 2,
           "--zoo-size", 3, "--zoo", zoo_dir, "--out", out)
    pairs = [tuple(p) for p in m["pairs"]]
    assert m["repeats"] == 2 and len(set(pairs)) == 2 and all(a < b and {a, b} <= {0, 1, 2} for a, b in pairs)
    assert json.loads((out / "config.json").read_text())["pairs"] == m["pairs"]
    arrays = np.load(out / "stitching.npz")
    assert arrays["penalty"].shape == (2, 2, 2) and arrays["pairs"].tolist() == m["pairs"]
    for i, kind in enumerate(m["kinds"]):
        by_pair = np.asarray(m["penalty_by_pair"][kind])
        np.testing.assert_allclose(by_pair, arrays["penalty"][:, i])
        np.testing.assert_allclose(m["penalty"][kind], by_pair.mean(0))
        np.testing.assert_allclose(m["penalty_std"][kind], by_pair.std(0, ddof=1))
        np.testing.assert_allclose(m["penalty_se"][kind], by_pair.std(0, ddof=1) / np.sqrt(2))
        assert m["mean_penalty_se"][kind] == pytest.approx(by_pair.mean(1).std(ddof=1) / np.sqrt(2))
        np.testing.assert_allclose(m["stitched_accuracy"][kind], arrays["stitched_accuracy"][:, i].mean(0))
        assert m["mean_penalty"][kind] == pytest.approx(by_pair.mean())
        assert m["mean_penalty_std"][kind] == pytest.approx(by_pair.mean(1).std(ddof=1))
        clean = np.asarray(m["clean_accuracy_by_pair"])
        np.testing.assert_allclose(by_pair, clean.mean(1)[:, None] - arrays["stitched_accuracy"][:, i], atol=1e-12)
    assert len(m["final_loss"]) == len(m["model_a"]) == 2 and zoo_member_path(zoo_dir, 2).exists()
    assert set(torch.load(out / "stitching_layers.pt")) == {f"pair{r}/{k}/{layer}" for r in (0, 1)
                                                            for k in m["kinds"] for layer in m["layers"]}
    printed = invoke("stitch", *TINY, "--kind", "linear", "--stitch-epochs", 1, "--repeats", 2, "--zoo-size", 3,
                     "--zoo", zoo_dir, "--layers", "act2", "--out", tmp_path / "printed").output
    assert "±" in printed and "(se " in printed
    for bad, message in ((["--repeats", 4, "--zoo-size", 3], "cannot draw 4 distinct pairs from 3 zoo models"),
                         (["--repeats", 2, "--seed-a", 0], "cannot be combined with --seed-a"),
                         (["--repeats", 0], "--repeats must be >= 1"), (["--zoo-size", 1], "--zoo-size must be >= 2")):
        assert message in _error(invoke("stitch", *TINY, *bad, "--zoo", zoo_dir, "--out", tmp_path / "x"))
        assert not (tmp_path / "x").exists()


def test_stitch_options_of_the_original_batch_norm_schedule_and_warmup(zoo_dir, tmp_path):
    out = tmp_path / "opts"
    m = ok("stitch", *TINY, "--kind", "permutation", "--stitch-epochs", 4, "--stitch-bn", "both", "--stitch-schedule",
           "step", "--no-perm-warmup", "--zoo", zoo_dir, "--layers", "act1", "--out", out)
    used = json.loads((out / "config.json").read_text())["stitch"]
    assert (used["batch_norm"], used["schedule"], used["perm_warmup"]) == ("both", "step", False)
    states = torch.load(out / "stitching_layers.pt")
    assert {"norm_before.running_mean", "norm_after.running_var"} <= set(states["permutation/act1"])
    assert 0.0 <= m["stitched_accuracy"]["permutation"][0] <= 1.0
    for bad, message in ((["--stitch-bn", "middle"], "unknown --stitch-bn 'middle'"),
                         (["--stitch-schedule", "cosine"], "unknown --stitch-schedule 'cosine'")):
        assert message in _error(invoke("stitch", *TINY, *bad, "--zoo", zoo_dir, "--out", tmp_path / "x"))


# -- probe -----------------------------------------------------------------------------------------


def test_probe_a_checkpoint_prints_the_invariance_table(zoo_dir, tmp_path):
    out = tmp_path / "probe"
    res = invoke("probe", "--checkpoint", zoo_member_path(zoo_dir, 0), "--repeats", 2, "--n-examples", 60, "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    m = json.loads((out / "metrics.json").read_text())
    assert m["layers"] == ["act1", "act2"] and m["sites"] == ["pre", "post"] and m["n_examples"] == 60
    assert m["max_deviation_invariant"] < 1e-5 and m["min_similarity_not_invariant"] < 0.99
    for layer in m["layers"]:
        assert m["table"][layer]["orthogonal"]["pre"]["cka"] == pytest.approx(1.0, abs=1e-5)
        assert m["table"][layer]["grelu"]["post"]["relu-procrustes"] == pytest.approx(1.0, abs=1e-5)
        assert (
            m["table"][layer]["grelu"]["pre"]["cka"] < 0.99
            and m["table"][layer]["orthogonal"]["pre"]["relu-cka"] < 0.99
        )
        assert m["output_change"][layer]["grelu"] < 1e-4 < m["output_change"][layer]["orthogonal"]
        assert m["accuracy"][layer]["grelu"] == m["clean_accuracy"]
    arrays = np.load(out / "probe.npz")
    assert arrays["similarity"].shape == (2, 3, 2, 7, 2) and (out / "figures" / "probe_table.png").exists()
    assert "relu-procrustes" in res.output and "orthogonal  pre" in res.output  # the printed table
    # the model's state_dict given as --weights: the same table
    torch.save(load_model(zoo_member_path(zoo_dir, 0))[0].state_dict(), tmp_path / "state.pt")
    ok("probe", *DATA, *MODEL, "--weights", tmp_path / "state.pt", "--repeats", 2, "--n-examples", 60,
       "--out", tmp_path / "w")
    np.testing.assert_allclose(np.load(tmp_path / "w" / "probe.npz")["similarity"], arrays["similarity"], atol=1e-9)


def test_probe_trains_its_model_and_refuses_bad_options(tmp_path):
    m = ok("probe", *TINY, "--layers", "act2", "--transforms", "grelu", "--repeats", 1, "--n-examples", 40,
           "--out", tmp_path / "p")
    assert m["layers"] == ["act2"] and m["transforms"] == ["grelu"] and (tmp_path / "p" / "model.pt").exists()
    for bad, message in ((["--transforms", "rotation"], "--transforms must be one of orthogonal, grelu, invertible, "
                                                          "received 'rotation'"),
                         (["--layers", "relu9"], "'relu9' not found"), (["--repeats", 0], "--repeats must be >= 1"),
                         (["--n-examples", 3], "--n-examples must be >= 4")):
        assert message in _error(invoke("probe", *TINY, *bad, "--out", tmp_path / "x"))
        assert not (tmp_path / "x").exists()


# -- bad input -------------------------------------------------------------------------------------


def _error(res) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), res.output
    return str(res.exception)


def test_bad_input_gives_clear_messages(zoo_dir, tmp_path):
    a = zoo_member_path(zoo_dir, 0)
    msg = _error(invoke("compare", *DATA, "--model-a", a, "--model-b", a, "--metric", "svcca", "--out", tmp_path / "x"))
    assert "unknown metric 'svcca'" in msg and "relu-procrustes" in msg
    msg = _error(
        invoke("stitch", *DATA, "--model-a", a, "--model-b", a, "--kind", "linear,rotation", "--out", tmp_path / "x")
    )
    assert "unknown stitching kind 'rotation'" in msg
    msg = _error(invoke("stitch", *DATA, "--model-a", a, "--model-b", a, "--layers", "fc9", "--out", tmp_path / "x"))
    assert "'fc9' not found" in msg and "act1, act2" in msg
    # a bad layer name is reported before any zoo member is trained
    msg = _error(invoke("compare", *TINY, "--layers", "act1,relu3", "--out", tmp_path / "y"))
    assert "'relu3' not found" in msg and not (tmp_path / "y" / "zoo").exists()
    msg = _error(invoke("compare", *DATA, "--model-a", a, "--seed-a", 0, "--out", tmp_path / "x"))
    assert "either --model-a PATH or --seed-a N" in msg
    msg = _error(
        invoke("compare", *DATA, "--model-a", tmp_path / "missing.pt", "--model-b", a, "--out", tmp_path / "x")
    )
    assert "no such checkpoint" in msg
    msg = _error(invoke("compare", *DATA, "--model-a", a, "--model-b", a, "--metric", "relu-cka", "--n-examples", 3,
                        "--out", tmp_path / "x"))
    assert "--n-examples must be >= 4" in msg


def test_a_zoo_trained_with_other_settings_is_refused_before_anything_is_written(zoo_dir, tmp_path):
    msg = _error(invoke("stitch", *DATA, *MODEL, "--epochs", "4", "--lr", "0.1", "--bs", "32", "--zoo", zoo_dir,
                        "--out", tmp_path / "x"))
    assert "was trained with train settings" in msg and not (tmp_path / "x").exists()


def test_models_for_different_datasets_are_refused(zoo_dir, tmp_path):
    other = tmp_path / "mnist1d.pt"
    module = build_model("mlp", (40,), 10, widths=(16, 16), seed=0)
    save_model(other, module, ModelConfig("mlp", widths=(16, 16)),
               SimpleNamespace(input_shape=(40,), num_classes=10, name="mnist1d"), 0)
    msg = _error(invoke("compare", *DATA, "--model-a", zoo_member_path(zoo_dir, 0), "--model-b", other,
                        "--out", tmp_path / "x"))
    assert "trained on dataset 'mnist1d'" in msg and "--dataset is 'digits'" in msg


@pytest.mark.slow
def test_demo_section(tmp_path):
    from modelsense.experiments.representations import representations_section

    section = representations_section(tmp_path, progress=False)
    assert all(p.exists() for p in section.figures) and len(section.figures) == 3
    assert section.metrics["probe: largest |1 - s| of the invariant metrics"] < 1e-5
    assert section.metrics["probe act1 orthogonal pre: cka"] == pytest.approx(1.0, abs=1e-5)
    assert {"relu-cka act1", "relu-cka act2"} <= set(
        section.metrics
    ) and "relu-cka is CKA of the kernel" in section.text
    assert section.metrics["cka act1"] > 0.5 and {k for k in section.metrics if k.startswith("penalty")} == {
        "penalty linear act1", "penalty linear act2", "penalty permutation act1", "penalty permutation act2"}
    # a second run reuses the zoo
    again = representations_section(tmp_path, progress=False)
    assert again.metrics == section.metrics


def test_stitching_figure_legend_names_both_clean_accuracy_lines():
    from modelsense.representations.plots import stitching_penalty_figure

    fig = stitching_penalty_figure(["act1", "act2"], {"linear": [0.1, 0.2]}, {"linear": [0.8, 0.7]}, [0.9, 0.85])
    ax_a = fig.axes[1]
    entries = {
        t.get_text(): h.get_linestyle() for t, h in zip(ax_a.get_legend().get_texts(), ax_a.get_legend().legend_handles)
    }
    assert entries["clean A"] == "--" and entries["clean B"] == ":"
    drawn = {line.get_linestyle() for line in ax_a.get_lines() if line.get_label().startswith("clean")}
    assert drawn == {"--", ":"}


RAW_RELU_MODEL = '''
from torch import nn


class RawReLU(nn.Module):
    """A ReLU on the raw (n, 1, 8, 8) images: no module with channel parameters runs before it."""

    def __init__(self, num_classes):
        super().__init__()
        self.raw = nn.ReLU()
        self.out = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.out(self.raw(x).flatten(1))


def make_model(input_shape, num_classes):
    return RawReLU(num_classes)
'''


def test_a_layer_whose_channel_axis_cannot_be_decided_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "raw_relu.py"
    path.write_text(RAW_RELU_MODEL)
    model = ["--model", f"{path}:make_model", *TRAIN]
    for command in ("compare", "stitch", "probe"):
        msg = _error(invoke(command, *DATA, *model, "--out", tmp_path / command))
        assert "channel axis of layer 'raw' of RawReLU" in msg and "channel_axis = -1" in msg, msg
        assert not (tmp_path / command).exists()


REUSED_RELU_MODEL = '''
from torch import nn


class TwiceReLU(nn.Module):
    """One `act` ReLU called twice per forward pass, after each hidden Linear layer."""

    def __init__(self, num_classes):
        super().__init__()
        self.a, self.b, self.out, self.act = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, num_classes), nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.b(self.act(self.a(x.flatten(1))))))


def make_model(input_shape, num_classes):
    return TwiceReLU(num_classes)
'''


def test_stitching_or_probing_a_module_called_twice_is_refused_before_anything_is_written(tmp_path):
    """compare reads both outputs (act#0, act#1); stitch and probe replace one output, so they refuse."""
    path = tmp_path / "twice_relu.py"
    path.write_text(REUSED_RELU_MODEL)
    model = ["--model", f"{path}:make_model", *TRAIN]
    for command, which in (("stitch", "twice_relu.py:make_model"), ("probe", "the model")):
        msg = _error(invoke(command, *DATA, *model, "--layers", "act", "--out", tmp_path / command))
        assert "module 'act' of " in msg and which in msg, msg
        assert "is called more than once per forward pass" in msg, msg
        assert not (tmp_path / command).exists()
