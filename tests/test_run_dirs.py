"""Run directories are the user's results: every command refuses to mix or overwrite them silently,
validates before writing, and marks what did not finish (modelsense.runs)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.errors import ConfigError
from modelsense.runs import RunDir, run_status

runner = CliRunner()
DATA = ["--dataset", "digits", "--n-train", "60"]
NET = ["--widths", "8", "--epochs", "2", "--bs", "32"]
MPE = ["--n-train", "80", "--widths", "8", "--epochs", "2", "--bs-jacs", "64"]

#: command -> (arguments of a tiny run, [bad options, each validated before anything is written])
COMMANDS = {
    "train": ([*DATA, *NET], [["--epochs", "0"], ["--model", "mpl"], ["--widths", "8,x"]]),
    "spectrum": (
        [*DATA, *NET, "--k", "2", "--trace-samples", "0", "--density-probes", "0"],
        [["--k", "0"], ["--matrix", "fim"], ["--k", "100000"]],
    ),
    "effdim width-sweep": (
        [*DATA, "--widths", "2,4", "--epochs", "2", "--k", "2"],
        [["--widths", "2,0"], ["--model", "lenet"]],
    ),
    "effdim blr": (["--n-points", "20", "--n-frequencies", "4"], [["--n-points", "0"], ["--x-max", "-1"]]),
    "effdim grid": (
        [*DATA, "--widths", "2,3", "--depths", "1", "--epochs", "2", "--k", "2"],
        [["--depths", "0"], ["--model", "lenet"], ["--repeats", "0"]],
    ),
    "perturb": (
        [*DATA, *NET, "--k", "3", "--n-top", "2", "--n-bottom", "1", "--n-random", "1", "--n-points", "5"],
        [["--n-points", "4"], ["--t-max", "0"], ["--n-top", "4"], ["--vectors", "nowhere"]],
    ),
    "mpe validation": (
        [*MPE, "--n-retrain", "4", "--epochs-retrain", "1"],
        [["--mpe-variant", "exact"], ["--n-retrain", "0"], ["--bs-retrain", "0"]],
    ),
    "mpe loo-iterations": (MPE, [["--var-version", "kron"]]),
    "mpe loo-l2reg": ([*MPE, "--n-exp", "2"], [["--optimizer", "ivon"], ["--deltas-stop", "-3"]]),
    "mpe evolving": ([*MPE, "--mc-samples", "4", "--n-bins", "4"], [["--checkpoint-iterations", "1000000"]]),
    "mpe loco": ([*MPE, "--epochs-retrain", "1"], [["--epochs-retrain", "0"]]),
    # + --runs of two tiny loco runs (the fixture `loco_runs`)
    "mpe loco-overlay": ([], [["--labels", "one"], ["--labels", "a,b,c"]]),
    "influence": (
        [*DATA, *NET, "--method", "grad-dot", "--n-test", "5"],
        [
            ["--method", "nope"],
            ["--method", "randproj", "--proj-dim", "0"],
            ["--memory-gb", "-1"],
            ["--top-k", "0"],
            ["--method", "if-cg", "--by-module"],
        ],
    ),
    "noisy-labels": (
        [*DATA, *NET, "--corruption-ratio", "0.2", "--methods", "loss"],
        [["--methods", "loss,nope"], ["--methods", "randproj", "--proj-dim", "0"], ["--corruption-ratio", "0"]],
    ),
    "prune": (
        [*DATA, *NET, "--methods", "loss", "--ks", "10", "--n-random", "1"],
        [["--ks", "100000"], ["--remove", "middle"], ["--methods", "grad-cos"]],
    ),
    "relabel": (
        [
            *DATA,
            *NET,
            "--corruption-ratio",
            "0.2",
            "--methods",
            "loss",
            "--budgets",
            "5,otsu",
            "--target",
            "other",
            "--n-random",
            "1",
        ],
        [
            ["--budgets", "5,lots"],
            ["--budgets", "100000"],
            ["--target", "oracle"],
            ["--methods", "grad-cos"],
            ["--n-random", "0"],
        ],
    ),
    "lds": (
        [*DATA, *NET, "--methods", "grad-dot", "--n-models", "3", "--n-test", "5"],
        [["--n-models", "2"], ["--alpha", "1.5"], ["--methods", "loss"]],
    ),
    "memorization": (
        [*DATA, *NET, "--n-models", "4", "--chunk-size", "2", "--min-held-out", "1"],
        [
            ["--n-models", "1"],
            ["--backend", "dask"],
            ["--influence", "most"],
            ["--chunk-size", "0"],
            ["--min-held-out", "0"],
            ["--min-held-out", "3"],
            ["--subset-ratios", "0.5,1.5"],
        ],
    ),
    "zoo": ([*DATA, *NET, "--n-models", "2"], [["--n-models", "0"], ["--method", "magic"]]),
    "compare": ([*DATA, *NET], [["--metric", "nope"], ["--layers", "relu9"], ["--n-examples", "1"]]),
    "stitch": (
        [*DATA, *NET, "--stitch-epochs", "1"],
        [
            ["--kind", "nope"],
            ["--layers", "relu9"],
            ["--repeats", "0"],
            ["--stitch-bn", "middle"],
            ["--repeats", "3", "--zoo-size", "2"],
        ],
    ),
    "probe": (
        [*DATA, *NET, "--repeats", "1", "--n-examples", "20"],
        [["--transforms", "rotation"], ["--layers", "relu9"], ["--repeats", "0"]],
    ),
    # + --checkpoint of a tiny trained model (the fixture `verify_checkpoint`)
    "verify": (
        ["--expected-accuracy", "0.5", "--tolerance", "1"],
        [["--tolerance", "-1"], ["--split", "val"], ["--expected-accuracy", "2"]],
    ),
    # + the run directory of a tiny trained model (the fixture `verify_checkpoint`) as its input
    "report": (["--title", "tiny"], [["no-such-run"]]),
}


@pytest.fixture(scope="module")
def loco_runs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("loco")
    for name in ("a", "b"):
        assert invoke("mpe loco", *COMMANDS["mpe loco"][0], "--out", root / name).exit_code == 0
    return f"{root / 'a'},{root / 'b'}"


@pytest.fixture(scope="module")
def verify_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "train"
    assert invoke("train", *DATA, *NET, "--out", out).exit_code == 0
    return out / "model.pt"


def invoke(command: str, *args) -> object:
    return runner.invoke(app, [*command.split(), *map(str, args), "--quiet"])


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (the lock file aside)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(res, *words: str) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), (res.output, res.exception)
    msg = str(res.exception)
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_never_mixes_overwrites_or_writes_before_validating(command, tmp_path, request):
    args, bad_options = COMMANDS[command]
    if command == "verify":
        args = [*args, "--checkpoint", request.getfixturevalue("verify_checkpoint")]
    if command == "mpe loco-overlay":
        args = [*args, "--runs", request.getfixturevalue("loco_runs")]
    if command == "report":
        args = [request.getfixturevalue("verify_checkpoint").parent, *args]
    out = tmp_path / "run"
    res = invoke(command, *args, "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert run_status(out) == "finished"
    assert json.loads((out / "metrics.json").read_text())["status"] == "finished"
    assert (out / "run.log").exists()
    assert not (out / "figures").exists() or any((out / "figures").iterdir())  # no empty figures/
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert len(modes) == 1, modes  # one file mode for every file
    before = snapshot(out)
    _numbers_before = _numbers(out / "metrics.json")
    # the same command again: refused, nothing changed
    refused(invoke(command, *args, "--out", out), "already holds a finished", "--overwrite")
    assert snapshot(out) == before
    for bad in bad_options:
        # a bad option with --overwrite is refused before the finished run is emptied
        msg = refused(invoke(command, *args, *bad, "--overwrite", "--out", out))
        assert "already holds" not in msg
        assert snapshot(out) == before, bad
        # ... and into a new folder nothing is created
        refused(invoke(command, *args, *bad, "--out", tmp_path / "new"))
        assert not (tmp_path / "new").exists(), bad
    # another command into this run: refused, even with --resume
    other = "train" if command != "train" else "zoo"
    refused(invoke(other, *COMMANDS[other][0], "--out", out), "already holds")
    assert snapshot(out) == before
    # --overwrite replaces the run, with the same numbers: nothing draws from an unseeded generator (the
    # first run moved torch's and numpy's global generators on)
    res = invoke(command, *args, "--overwrite", "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert run_status(out) == "finished"
    assert _numbers(out / "metrics.json") == _numbers_before


def _numbers(path: Path) -> dict:
    """metrics.json without what differs between two equal runs: times, dates, paths, the machine's load."""
    def keep(key: str) -> bool:
        return not any(w in key for w in ("second", "time", "date", "created", "path", "load", "rss", "dir"))

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if keep(str(k))}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(path.read_text()))


def test_overwrite_never_empties_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    refused(
        invoke("train", *DATA, *NET, "--overwrite", "--out", tmp_path / "mine"), "not a modelsense run", "never emptied"
    )
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    refused(invoke("train", *DATA, *NET, "--out", tmp_path / "file"), "not a directory")


def test_resume_says_which_options_differ_and_non_resumable_commands_refuse_it(tmp_path):
    out = tmp_path / "mem"
    assert invoke("memorization", *COMMANDS["memorization"][0], "--out", out).exit_code == 0
    before = snapshot(out)
    msg = refused(
        invoke(
            "memorization",
            *COMMANDS["memorization"][0],
            "--subset-ratio",
            "0.5",
            "--lr",
            "0.2",
            "--resume",
            "--out",
            out,
        ),
        "subset_ratio 0.5 (stored 0.7)",
        "train.lr 0.2 (stored",
    )
    assert "{" not in msg  # names the options, does not dump the config
    assert snapshot(out) == before
    res = invoke(
        "train", *DATA, *NET, "--resume", "--out", tmp_path / "t"
    )  # a command that cannot resume has no --resume
    assert res.exit_code == 2 and "No such option: --resume" in res.output and not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="cannot continue a run"):
        RunDir.check_out(tmp_path / "t", "train", {}, resume=True)
    refused(invoke("memorization", *COMMANDS["memorization"][0], "--resume", "--overwrite", "--out", out), "exclude")


def test_resume_removes_outputs_that_are_not_resumable_state(tmp_path):
    """A stale array of an earlier run (e.g. --influence full) never survives a --resume."""
    out = tmp_path / "mem"
    args = COMMANDS["memorization"][0]
    assert invoke("memorization", *args, "--influence", "full", "--out", out).exit_code == 0
    assert (out / "influence.npy").exists()
    assert invoke("memorization", *args, "--influence", "topk", "--resume", "--out", out).exit_code == 0
    assert not (out / "influence.npy").exists() and (out / "influence_top_indices.npy").exists()
    assert run_status(out) == "finished"


def test_checkpoint_of_an_unfinished_run_is_refused(tmp_path):
    run = tmp_path / "t"
    assert invoke("train", *DATA, *NET, "--out", run).exit_code == 0
    ckpt = run / "model.pt"
    assert (
        invoke(
            "influence", *DATA, "--checkpoint", ckpt, "--method", "loss", "--self", "--out", tmp_path / "ok"
        ).exit_code
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for status, words in (("failed", "failed"), ("interrupted", "was interrupted"), ("running", "did not finish")):
        (run / "metrics.json").write_text(json.dumps({**metrics, "status": status}))
        refused(invoke("influence", *DATA, "--checkpoint", ckpt, "--method", "loss", "--self",
                       "--out", tmp_path / status), words, str(run))
        assert not (tmp_path / status).exists()


def test_two_processes_never_write_one_folder(tmp_path):
    from modelsense.runs import locked

    out = tmp_path / "busy"
    with RunDir.open(out, "train", {"a": 1}):
        assert run_status(out) == "running"
        refused(invoke("train", *DATA, *NET, "--overwrite", "--out", out), "in use by another modelsense process")
        with pytest.raises(ConfigError, match="in use"), locked(out):
            pass
    assert run_status(out) == "finished"


def test_damaged_config_is_one_clear_message(tmp_path):
    out = tmp_path / "t"
    assert invoke("train", *DATA, *NET, "--out", out).exit_code == 0
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])
    refused(invoke("train", *DATA, *NET, "--out", out), "config.json is damaged", "--overwrite")
    refused(invoke("influence", *DATA, "--checkpoint", out / "model.pt", "--method", "loss", "--self",
                   "--out", tmp_path / "x"), "config.json is damaged")


def _cli(*args: str, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modelsense", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}, **kw)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_ctrl_c_prints_one_line_marks_the_run_and_resume_continues(tmp_path):
    out = tmp_path / "mem"
    args = ["memorization", *DATA, *NET, "--epochs", "40", "--n-models", "8", "--chunk-size", "2", "--quiet",
            "--out", str(out)]
    proc = _cli(*args)
    _wait_for(lambda: len(list(out.glob("store/*/chunks/*.npz"))) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0] and "Traceback" not in err, err
    assert run_status(out) == "interrupted"
    kept = len(list(out.glob("store/*/chunks/*.npz")))
    assert kept >= 1
    res = invoke(*args[:1], *args[1:-2], "--resume", "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert run_status(out) == "finished" and json.loads((out / "metrics.json").read_text())["n_models"] == 8


@pytest.mark.slow
def test_ctrl_c_of_a_command_that_cannot_resume_says_to_overwrite(tmp_path):
    out = tmp_path / "t"
    proc = _cli("train", *DATA, "--widths", "8", "--epochs", "100000", "--quiet", "--out", str(out))
    _wait_for(lambda: _status(out) == "running", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--overwrite" in err and "Traceback" not in err, err
    assert run_status(out) == "interrupted" and not (out / "model.pt").exists()
