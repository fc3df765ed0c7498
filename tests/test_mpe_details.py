"""The MPE details of issue 14: loo-l2reg's moving-average smoothing (`--smooth`), the overlay of several
loco runs (`mpe loco-overlay`), and validation's ground truth retrained from scratch (`--truth scratch`)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import modelsense.cli.mpe  # noqa: F401  (registers the sub-app)
from modelsense.cli.app import app
from modelsense.errors import ConfigError
from modelsense.mpe.evaluation import moving_average, smoothed_curves

TINY = ["--n-train", "120", "--widths", "8", "--epochs", "2", "--quiet", "--bs-jacs", "64"]


def invoke(*args):
    return CliRunner().invoke(app, ["mpe", *map(str, args)])


def test_smoothed_curves_by_hand():
    deltas = np.array([1.0, 10.0, 100.0, 1000.0])
    c = smoothed_curves(deltas, [4.0, 2.0, 0.0, 6.0], [1.0, 3.0, 5.0, 7.0], 2)
    np.testing.assert_allclose(c["deltas"], [10 ** 0.5, 10 ** 1.5, 10 ** 2.5])  # geometric mean of each window
    np.testing.assert_allclose(c["estimated_nll"], [3.0, 1.0, 3.0])
    np.testing.assert_allclose(c["test_nll"], [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(moving_average([1.0, 2.0], 1), [1.0, 2.0])  # window 1: unchanged
    np.testing.assert_array_equal(moving_average([1.0, 2.0], 3), [1.0, 2.0])  # longer than the values: unchanged


def test_loo_l2reg_smooth_reports_the_smoothed_curves_and_their_minima(tmp_path):
    out = tmp_path / "l2"
    res = invoke("loo-l2reg", *TINY, "--n-exp", "4", "--smooth", "2", "--out", out)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    arrays = np.load(out / "loo_l2reg.npz")
    ref = smoothed_curves(arrays["deltas"], arrays["estimated_nll"], arrays["test_nll"], 2)
    for k, v in ref.items():
        np.testing.assert_allclose(m["smoothed"][k], v)
        np.testing.assert_allclose(arrays[f"smoothed_{k}"], v)
    assert m["smoothed"]["best_delta_estimated"] == ref["deltas"][np.argmin(ref["estimated_nll"])]
    assert m["smoothed"]["best_delta_test"] == ref["deltas"][np.argmin(ref["test_nll"])]
    assert m["smooth"] == 2 and "moving average of 2" in res.output
    assert (out / "figures" / "loo_l2reg.png").exists()


@pytest.mark.parametrize("smooth", ["0", "5"])
def test_loo_l2reg_smooth_out_of_range_is_refused_before_writing(tmp_path, smooth):
    res = invoke("loo-l2reg", *TINY, "--n-exp", "4", "--smooth", smooth, "--out", tmp_path / "x")
    assert isinstance(res.exception, ConfigError) and "--smooth must lie in [1, --n-exp = 4]" in str(res.exception)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def loco_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loco")
    for name, widths in (("narrow", "8"), ("wide", "16")):
        res = invoke("loco", *TINY, "--widths", widths, "--epochs-retrain", "1", "--out", root / name)
        assert res.exit_code == 0, res.output
    return root / "narrow", root / "wide"


def test_loco_overlay_draws_every_run_with_its_numbers(loco_runs, tmp_path):
    out = tmp_path / "overlay"
    res = invoke("loco-overlay", "--runs", f"{loco_runs[0]},{loco_runs[1]}", "--labels", "MLP 8,MLP 16", "--quiet",
                 "--out", out)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert [r["label"] for r in m["runs"]] == ["MLP 8", "MLP 16"]
    for r, path in zip(m["runs"], loco_runs):
        assert r["spearman"] == json.loads((path / "metrics.json").read_text())["spearman"]
    assert (out / "figures" / "loco_overlay.png").stat().st_size > 1000
    from modelsense.mpe.plots import plot_loco

    runs = [{**json.loads((p / "metrics.json").read_text()), "label": str(p)} for p in loco_runs]
    fig = plot_loco(runs)  # one scatter per run, with a legend
    assert len(fig.axes[0].collections) == 2 and fig.axes[0].get_legend() is not None


def test_loco_overlay_refuses_bad_runs_before_writing(loco_runs, tmp_path):
    a, b = map(str, loco_runs)
    train = tmp_path / "train"
    assert CliRunner().invoke(app, ["train", *TINY[:4], "--epochs", "1", "--quiet", "--out", str(train)]).exit_code == 0
    for runs, labels, says in ((a, "", "two or more"), (f"{a},{b}", "one", "one per run"),
                               (f"{a},{tmp_path}", "", "not a run directory"), (f"{a},{train}", "", "'train' run")):
        res = invoke("loco-overlay", "--runs", runs, *(["--labels", labels] if labels else []), "--out", tmp_path / "x")
        assert isinstance(res.exception, ConfigError) and says in str(res.exception), (runs, res.output)
        assert not (tmp_path / "x").exists()


def test_validation_truth_scratch_retrains_from_the_initialisation(tmp_path):
    """From scratch, the control model (all data, the training recipe and seed) is the trained model again
    (the engine trains as `fit`, up to rounding); warm-started retraining starts from it instead."""
    out = tmp_path / "scratch"
    res = invoke("validation", *TINY, "--n-retrain", "4", "--truth", "scratch", "--out", out)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["truth"] == "scratch" and "from scratch" in res.output
    v = np.load(out / "validation.npz")
    idx = v["indices"]
    torch.testing.assert_close(torch.from_numpy(v["control_logits"]), torch.from_numpy(v["logits"][idx]),
                               atol=1e-3, rtol=1e-3)
    recipes = [json.loads(p.read_text())["recipe"] for p in (out / "store").glob("*/recipe.json")]
    assert [r.get("init") for r in recipes] == ["scratch"], recipes
    assert recipes[0]["train"]["epochs"] == 2  # the training recipe, not --epochs-retrain


def test_validation_truth_scratch_needs_an_engine_optimizer(tmp_path):
    res = invoke("validation", *TINY, "--optimizer", "ivon", "--truth", "scratch", "--out", tmp_path / "x")
    assert isinstance(res.exception, ConfigError) and "--truth scratch retrains with the training recipe" in str(
        res.exception)
    res = invoke("validation", *TINY, "--truth", "cold", "--out", tmp_path / "x")
    assert isinstance(res.exception, ConfigError) and "--truth must be one of warm, scratch" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_agreement_with_last_and_binned_by_rank_by_hand():
    from modelsense.mpe.evaluation import agreement_with_last, binned_by_rank

    last = np.arange(20.0)  # example 19 most sensitive
    sens = np.stack([-last, last])
    a = agreement_with_last(sens)
    assert a["spearman_to_last"] == pytest.approx([-1.0, 1.0])
    assert a["top_decile_overlap_to_last"] == [0.0, 1.0]  # top 2 of the last row: 19, 18
    order, binned = binned_by_rank(sens, 4)
    assert order[:3].tolist() == [19, 18, 17]
    np.testing.assert_allclose(binned[1], [17.0, 12.0, 7.0, 2.0])  # means of 19..15, 14..10, ...
    np.testing.assert_allclose(binned[0], -binned[1])
