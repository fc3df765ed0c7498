import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.errors import DataError
from modelsense.models.checkpoint import load_model
from modelsense.runs import RunDir

runner = CliRunner()


def test_datasets_and_models_list():
    res = runner.invoke(app, ["datasets"])
    assert res.exit_code == 0 and "digits" in res.output and "1297" in res.output and "mnist1d" in res.output
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "resnet20_frn" in res.output


def test_train_end_to_end_writes_run_directory(tmp_path, digits):
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            "digits",
            "--model",
            "mlp",
            "--widths",
            "32",
            "--epochs",
            "8",
            "--lr",
            "0.1",
            "--checkpoint-epochs",
            "4",
            "--checkpoint-iterations",
            "5",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train_accuracy", "test_accuracy", "test_nll"} <= set(metrics)
    assert metrics["test_accuracy"] > 0.85
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "train" and config["train"]["epochs"] == 8 and config["train"]["seed"] == 0
    assert "torch" in config["versions"] and "modelsense" in config["versions"]
    assert (out / "figures" / "learning_curves.png").stat().st_size > 1000
    assert (out / "checkpoint_epoch_4.pt").exists() and (out / "checkpoint_iteration_5.pt").exists()
    hist = np.load(out / "history.npz")
    assert len(hist["test_accuracy"]) == 8
    module, info = load_model(out / "model.pt")
    import torch

    with torch.no_grad():
        acc = (module(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc == pytest.approx(metrics["test_accuracy"])


def test_train_bad_dataset_fails_before_writing(tmp_path):
    out = tmp_path / "never"
    res = runner.invoke(app, ["train", "--dataset", "nope", "--out", str(out)])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    assert "known: digits" in str(res.exception)
    assert not out.exists()


def test_main_prints_clear_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelsense", "train", "--dataset", str(tmp_path / "missing.npz"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_unusable_device_is_one_message_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "modelsense", "train", "--device", "cuda:999", "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "cuda:999" in proc.stderr and "--device cpu" in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 4
    assert not out.exists()


def test_bad_option_value_is_reported(tmp_path):
    res = runner.invoke(app, ["train", "--optimizer", "rmsprop", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "unknown optimizer" in str(res.exception)


def test_demo_training_section_writes_report(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--sections", "train", "--quiet"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "test_accuracy" in html
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--sections", "nope", "--quiet"])
    assert res.exit_code != 0 and "unknown demo sections" in str(res.exception)


@pytest.mark.slow
def test_full_demo(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("<h2>") >= 2 and "auc_corrupted" in html


def test_run_dir_atomic_and_resume_checks(tmp_path):
    from modelsense.errors import ConfigError

    with RunDir.open(tmp_path / "r", "x", {"a": 1}, keep=("state",)) as run:
        run.save_array("arr", np.arange(3))
        assert np.array_equal(run.load_array("arr"), np.arange(3))
        run.update_metrics(m=1.0)
        run.update_metrics(n=float("nan"))
        assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == {"m": 1.0, "n": None, "status": "running"}
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["status"] == "finished"
    RunDir.check_out(tmp_path / "r", "x", {"a": 1}, resume=True, resumable=True)
    with pytest.raises(ConfigError, match=r"a 2 \(stored 1\)"):
        RunDir.check_out(tmp_path / "r", "x", {"a": 2}, resume=True, resumable=True)
    with pytest.raises(ConfigError, match="holds a 'x' run"):
        RunDir.check_out(tmp_path / "r", "y", {"a": 1}, resume=True, resumable=True)
    with pytest.raises(ConfigError, match="already holds a finished 'x' run"):
        RunDir.check_out(tmp_path / "r", "x", {"a": 1})
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".tmp")]
    assert (tmp_path / "r" / "arr.npy").stat().st_mode & 0o777 == (
        tmp_path / "r" / "metrics.json"
    ).stat().st_mode & 0o777


@pytest.mark.parametrize("args", [["--help"], ["mpe", "validation", "--help"], ["stitch", "--help"]])
def test_help_does_not_import_the_heavy_libraries(args):
    # start-up time: only what option declarations need is imported; experiments import scipy,
    # matplotlib, scikit-learn, ray inside the command bodies (bench/cli_startup.py times it)
    code = ("import sys, runpy\n"
            f"sys.argv = ['modelsense', *{args!r}]\n"
            "try:\n    runpy.run_module('modelsense', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "heavy = ('matplotlib', 'scipy', 'sklearn', 'ray')\n"
            "print('loaded:' + ','.join(m for m in heavy if m in sys.modules), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "loaded:"


def test_unknown_command_is_a_usage_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "modelsense", "nosuchcommand"], capture_output=True, text=True)
    assert proc.returncode == 2 and "No such command" in proc.stderr and "Traceback" not in proc.stderr


def test_train_config_names_optimizers_as_the_cli_takes_them():
    """The MPE code's name `iblr` is IVON, adamw is accepted and an unknown optimizer is refused (the
    options are declared on TrainConfig, so the CLI and Python share these rules)."""
    from modelsense.errors import ConfigError
    from modelsense.training import TrainConfig

    assert TrainConfig(optimizer="IBLR").optimizer == "ivon"
    assert TrainConfig(optimizer="adamw").optimizer == "adamw"
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        TrainConfig(optimizer="lamb")


def test_mpe_retraining_options_are_checked_by_train_config(tmp_path):
    from modelsense.errors import ConfigError

    for flag, value, says in (("--bs-retrain", "0", "bs (batch size) must be >= 1, got 0"),
                              ("--lr-retrain", "-1", "lr must be > 0, got -1.0")):
        res = runner.invoke(app, ["mpe", "validation", flag, value, "--out", str(tmp_path / "never")])
        assert isinstance(res.exception, ConfigError) and says in str(res.exception)
        assert flag in str(res.exception) and not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "flag,value,says",
    [
        ("--memory-gb", "-1", "--memory-gb must be > 0, received -1"),
        ("--memory-gb", "inf", "--memory-gb must be < inf, received inf"),
        ("--memory-gb", "nan", "--memory-gb must be > 0"),
        ("--bs-jacs", "0", "--bs-jacs must be an integer >= 1"),
        ("--proj-dim", "0", "--proj-dim must be an integer >= 1, received 0"),
        ("--spill", "maybe", "--spill"),
    ],
)
def test_method_settings_are_reported_by_their_option_names(tmp_path, flag, value, says):
    from modelsense.errors import ConfigError

    res = runner.invoke(app, ["noisy-labels", flag, value, "--out", str(tmp_path / "never")])
    assert isinstance(res.exception, ConfigError) and says in str(res.exception)
    assert "memory_budget" not in str(res.exception) and not (tmp_path / "never").exists()


def test_error_message_is_printed_verbatim_not_as_rich_markup(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelsense", "spectrum", "--s", "nan", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "received [nan]" in proc.stderr


def test_checkpoint_that_is_not_ours_is_explained(tmp_path):
    import torch
    from torch import nn

    from modelsense.errors import ConfigError

    module = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    cases = {
        "module.pt": (module, "holds pickled Python objects (such as a whole module saved with torch.save(model))"),
        "state_dict.pt": (
            module.state_dict(),
            "is not a modelsense checkpoint: it lacks state_dict, model, input_shape",
        ),
        "list.pt": ([1, 2], "is not a modelsense checkpoint"),
        "partial.pt": ({"model": {"name": "mlp"}}, "it lacks state_dict, input_shape, num_classes"),
    }
    for name, (obj, says) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ConfigError) as info:
            load_model(tmp_path / name)
        text = str(info.value)
        assert says in text and "`modelsense train`" in text, text
        assert "interpreted as an integer" not in text and "('model')" not in text and "\x1b" not in text
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConfigError, match="cannot be read: it is damaged or not a PyTorch file"):
        load_model(tmp_path / "text.pt")


def test_demo_with_some_sections_keeps_the_other_sections_of_the_folder(tmp_path, monkeypatch):
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelsense.experiments import demo
    from modelsense.report import Section

    calls = []

    def fake(name):
        def section(out, progress, resume=False):
            calls.append(name)
            run = out / name
            (run / "figures").mkdir(parents=True, exist_ok=True)
            fig, _ = plt.subplots()
            fig.savefig(run / "figures" / "f.png")
            plt.close(fig)
            return Section(f"Section {name}", f"text of {name}", {f"{name}_value": 0.5 + len(calls)},
                           [run / "figures" / "f.png"], str(run))
        return section

    def metrics():
        m = json.loads((out / "metrics.json").read_text())
        m.pop("status", None)
        return m

    monkeypatch.setattr(demo, "SECTIONS", {n: (fake(n), n) for n in ("a", "b", "c")})
    out = tmp_path / "demo"
    demo.run_demo(out, progress=False, sections=["c", "a"])
    demo.run_demo(out, progress=False, sections=["b"], resume=True)
    html = (out / "report.html").read_text()
    # all three, in SECTIONS order, b from the second run and a, c kept from the first
    assert html.index("Section a") < html.index("Section b") < html.index("Section c") and html.count("<img") == 3
    assert metrics() == {"Section a": {"a_value": 2.5}, "Section b": {"b_value": 3.5}, "Section c": {"c_value": 1.5}}
    demo.run_demo(out, progress=False, sections=["a"], resume=True)  # a section run again replaces only itself
    assert metrics()["Section a"] == {"a_value": 4.5} and metrics()["Section c"] == {"c_value": 1.5}
    shutil.rmtree(out / "c")  # a section whose run folder is gone is not shown any more
    demo.run_demo(out, progress=False, sections=["b"], resume=True)
    html = (out / "report.html").read_text()
    assert "Section c" not in html and "Section a" in html and calls == ["c", "a", "b", "a", "b"]
    demo.run_demo(out, progress=False, sections=["b"], overwrite=True)  # --overwrite starts the folder afresh
    assert list(metrics()) == ["Section b"]


def test_help_texts_name_the_paper_they_refer_to():
    import re

    import typer

    def walk(command, path=()):
        yield path, command.help or ""
        for param in command.params:
            yield (*path, param.name), getattr(param, "help", None) or ""
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    texts = list(walk(typer.main.get_command(app)))
    assert len(texts) > 100  # every command and option was visited
    vague = [(p, t) for p, t in texts if re.search(r"\bthe (paper|papers|original)\b", t)]
    unnamed_figures = [(p, t) for p, t in texts if re.search(r"(?<!\d, )\bFig\. \d", t)]
    assert not vague and not unnamed_figures, vague + unnamed_figures
