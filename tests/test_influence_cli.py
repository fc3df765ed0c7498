"""The influence commands with `--checkpoint`: scoring a model.pt of `modelsense train` instead of training."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.cli import app, main
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.models.checkpoint import load_model

runner = CliRunner()
DATA = ["--dataset", "digits", "--n-train", "60"]
TRAIN = ["--widths", "8", "--epochs", "4", "--bs", "32", "--lr", "0.1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args) -> dict:
    res = invoke(*args, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = args[list(args).index("--out") + 1]
    return json.loads((out / "metrics.json").read_text())


def error(res) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), res.output
    return str(res.exception)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny `modelsense train` run with epoch checkpoints (its run directory)."""
    out = tmp_path_factory.mktemp("train") / "run"
    res = invoke("train", *DATA, *TRAIN, "--checkpoint-epochs", "2,4", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    return out


def test_grad_dot_of_a_checkpoint_is_the_gradient_inner_product(trained, tmp_path):
    out = tmp_path / "inf"
    ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "grad-dot", "--n-test", 4,
       "--bs-jacs", 7, "--memory-gb", 0.5, "--out", out)
    scores = np.load(out / "scores.npy")
    module, _ = load_model(trained / "model.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=60))
    params = dict(module.named_parameters())

    def grads(x, y):  # one example at a time: the definition, slowly
        rows = []
        for xi, yi in zip(x, y):
            loss = torch.nn.functional.cross_entropy(module(xi[None]), yi[None])
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))]))
        return torch.stack(rows)

    expected = (grads(data.x_train, data.y_train) @ grads(data.x_test[:4], data.y_test[:4]).T).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["path"] == str(trained / "model.pt") and config["source"]["recipe"] == "config.json"
    assert config["train"]["epochs"] == 4 and config["model"]["widths"] == [8]  # the run's, not the command's
    assert config["settings"]["bs_jacs"] == 7 and config["settings"]["memory_gb"] == 0.5  # the method settings
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(
        json.loads((trained / "metrics.json").read_text())["test_accuracy"]
    )


def test_tracin_of_a_checkpoint_equals_tracin_trained_in_the_command(trained, tmp_path):
    """The run's checkpoint_epoch_*.pt and config.json give the same checkpoints and learning rates."""
    ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "tracin", "--n-test", 3,
       "--out", tmp_path / "a")
    ok("influence", *DATA, *TRAIN, "--checkpoint-epochs", "2,4", "--method", "tracin", "--n-test", 3,
       "--out", tmp_path / "b")
    a, b = np.load(tmp_path / "a" / "scores.npy"), np.load(tmp_path / "b" / "scores.npy")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.abs(a).max() > 0


def test_lds_retrains_with_the_checkpoint_runs_recipe(trained, tmp_path):
    out = tmp_path / "lds"
    m = ok("lds", *DATA, "--checkpoint", trained / "model.pt", "--methods", "grad-dot", "--n-models", 3,
           "--n-test", 5, "--out", out)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 4 and config["train"]["lr"] == 0.1  # not the command's defaults 50 / 0.1
    assert set(m["lds"]) == {"grad-dot"} and np.load(out / "lds_per_test.npz")["grad_dot"].shape == (5,)
    (chunk,) = (out / "store").glob("*/chunks/*.npz")  # the 3 retrained models, in the ground-truth store
    assert np.load(chunk)["test_loss"].shape[0] == 3


def test_checkpoint_of_another_dataset_is_an_error_with_exit_code_2(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    monkeypatch.setattr("sys.argv", ["modelsense", "influence", "--dataset", "mnist1d", "--n-train", "50",
                                     "--checkpoint", str(trained / "model.pt"), "--method", "grad-dot",
                                     "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--dataset 'mnist1d' (the checkpoint's: 'digits')" in err and "Traceback" not in err
    assert not out.exists()  # checked before anything is written
    msg = error(invoke("noisy-labels", *DATA, "--checkpoint", tmp_path / "missing.pt", "--methods", "loss",
                       "--out", tmp_path / "x"))
    assert "not found" in msg


def test_what_a_bare_model_pt_cannot_give_is_a_clear_error(trained, tmp_path):
    bare = tmp_path / "bare"  # model.pt alone: no config.json, no epoch checkpoints
    bare.mkdir()
    shutil.copy(trained / "model.pt", bare / "model.pt")
    msg = error(
        invoke("influence", *DATA, "--checkpoint", bare / "model.pt", "--method", "tracin", "--out", tmp_path / "a")
    )
    assert "no checkpoint_epoch_<E>.pt" in msg and "--checkpoint-epochs" in msg and "another method" in msg
    assert not (tmp_path / "a").exists()
    for f in trained.glob("checkpoint_epoch_*.pt"):  # snapshots but no config.json: learning rates unknown
        shutil.copy(f, bare / f.name)
    msg = error(
        invoke("influence", *DATA, "--checkpoint", bare / "model.pt", "--method", "tracin-rp", "--out", tmp_path / "b")
    )
    assert "no config.json" in msg and "learning rates" in msg
    # without config.json the command's training options are the recipe
    ok("influence", *DATA, "--checkpoint", bare / "model.pt", "--method", "loss", "--self", "--epochs", 7,
       "--out", tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["source"]["recipe"] == "options" and config["train"]["epochs"] == 7
    # mpe after IVON/Adam training reads the optimizer state, which model.pt does not hold
    ivon = tmp_path / "ivon"
    shutil.copytree(trained, ivon)
    cfg = json.loads((ivon / "config.json").read_text())
    cfg["train"]["optimizer"] = "adam"
    cfg["data"]["corruption_ratio"] = 0.1  # the data recipe of noisy-labels comes from the checkpoint's run
    (ivon / "config.json").write_text(json.dumps(cfg))
    msg = error(invoke("noisy-labels", *DATA, "--checkpoint", ivon / "model.pt",
                       "--methods", "loss,mpe", "--out", tmp_path / "d"))
    assert "mpe reads the posterior of a model trained with adam from the optimizer state" in msg


def test_a_setting_no_asked_method_takes_is_refused_by_its_option_name(tmp_path):
    msg = error(invoke("influence", *DATA, *TRAIN, "--method", "grad-dot", "--proj-dim", 7, "--out", tmp_path / "a"))
    assert "--proj-dim" in msg and "randproj" in msg and "'proj_dim'" not in msg
    assert not (tmp_path / "a").exists()


def test_save_state_then_state_scores_new_data_without_refitting(trained, tmp_path):
    first = tmp_path / "first"
    ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "if-ekfac", "--n-test", 6, "--save-state",
       "--out", first)
    assert (first / "state" / "attributor.json").exists()
    again = tmp_path / "again"
    m = ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "if-ekfac", "--n-test", 6,
           "--state", first / "state", "--out", again)
    assert m["state"] == "loaded"
    np.testing.assert_allclose(np.load(again / "scores.npy"), np.load(first / "scores.npy"), rtol=1e-4, atol=1e-7)
    msg = error(invoke("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "if-ekfac", "--damping", 3,
                       "--state", first / "state", "--out", tmp_path / "x"))
    assert "damping" in msg
    msg = error(invoke("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "grad-dot",
                       "--state", first / "state", "--out", tmp_path / "y"))
    assert "holds a fitted 'if-ekfac'" in msg and not (tmp_path / "y").exists()


def test_by_module_writes_the_exact_split_and_the_module_shares(trained, tmp_path):
    out = tmp_path / "mod"
    m = ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "if-ekfac", "--n-test", 6,
           "--by-module", "--out", out)
    parts = np.load(out / "scores_by_module.npz")
    assert parts.files == ["fc1", "out"]  # the Linear modules of the width-8 MLP
    total = np.load(out / "scores.npy")
    np.testing.assert_allclose(sum(parts[k] for k in parts.files), total, rtol=1e-5, atol=1e-6 * np.abs(total).max())
    for kind in ("helpful", "harmful"):
        assert sorted(m["module_share"][kind]) == sorted(parts.files)
        assert abs(sum(m["module_share"][kind].values()) - 1) < 1e-6
    assert sum(m["module_params"].values()) == sum(p.numel() for p in load_model(trained / "model.pt")[0].parameters())
    assert (out / "figures" / "module_shares.png").exists()
    out = tmp_path / "self"
    ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "grad-dot", "--self", "--by-module",
       "--out", out)
    assert abs(sum(json.loads((out / "metrics.json").read_text())["module_share"]["highest self-influence"].values())
               - 1) < 1e-6
    selfs = np.load(out / "self_influence_by_module.npz")
    np.testing.assert_allclose(sum(selfs[k] for k in selfs.files), np.load(out / "self_influence.npy"), rtol=1e-6)
    res = invoke("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "trak", "--by-module",
                 "--out", tmp_path / "no")
    assert "does not split exactly over modules" in error(res) and "if-ekfac" in error(res)
    assert not (tmp_path / "no").exists()


def test_spill_on_writes_the_training_features_once_with_the_same_scores(trained, tmp_path, monkeypatch):
    """--spill on/off reach ComputeOptions.spill: with a tiny --memory-gb the training features go to a
    scratch file (under $MODELSENSE_SCRATCH) once, and the scores equal recomputing them per test block."""
    from modelsense.data import scratch

    monkeypatch.setenv(scratch.SCRATCH_ENV, str(tmp_path))
    mapped, original = [], scratch.open_map
    monkeypatch.setattr(scratch, "open_map", lambda path, *a: mapped.append(str(path)) or original(path, *a))
    scores = {}
    for spill in ("off", "on"):
        mapped.clear()
        out = tmp_path / f"inf_{spill}"
        ok("influence", *DATA, "--checkpoint", trained / "model.pt", "--method", "if-ekfac", "--n-test", 12,
           "--memory-gb", 2e-6, "--spill", spill, "--out", out)
        scores[spill] = np.load(out / "scores.npy")
        spilled = [p for p in mapped if os.path.basename(p).startswith("features_if-ekfac_")]
        assert bool(spilled) == (spill == "on") and all(os.path.dirname(p) == str(tmp_path) for p in spilled), mapped
        assert json.loads((out / "config.json").read_text())["settings"]["spill"] == spill
    np.testing.assert_allclose(scores["on"], scores["off"], rtol=1e-6, atol=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf_off", "inf_on"]  # no scratch file left
