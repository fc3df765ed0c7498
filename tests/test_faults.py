"""Fault injection: kill -9 at several points, a full disk (a file-size limit), damaged files. No later
command may read a partial file as complete, and every fault ends in one clear message."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.errors import ConfigError
from modelsense.runs import TEMP_PREFIX, run_status

pytestmark = pytest.mark.slow
runner = CliRunner()
DATA = ["--dataset", "digits", "--n-train", "200"]
BIG = ["--widths", "512,512", "--bs", "64"]  # model.pt of about 1.3 MB: writing it takes a while


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def _start(*args: str, fsize: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, "-m", "modelsense", *map(str, args), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=limit)


def _kill_when(proc: subprocess.Popen, predicate, timeout: float = 180.0) -> None:
    """SIGKILL `proc` as soon as `predicate()` holds (polled every millisecond)."""
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"finished before the fault was injected: {proc.communicate()}")
        assert time.monotonic() - start < timeout, "timed out waiting for the fault point"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def _temp_named(out: Path, stem: str):
    return lambda: out.exists() and any(p.name.startswith(f"{TEMP_PREFIX}{stem}") for p in out.rglob(f"{TEMP_PREFIX}*"))


def assert_every_final_file_complete(out: Path) -> None:
    """Every file under a final name loads whole: nothing partial is there to be read."""
    import matplotlib.image

    for p in out.rglob("*"):
        if not p.is_file() or p.name.startswith(TEMP_PREFIX) or p.name == ".lock":
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":
            np.load(p)
        elif p.suffix == ".npz":
            with np.load(p) as f:
                for k in f.files:
                    f[k]
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".png":
            matplotlib.image.imread(p)


def refused(res, *words: str) -> str:
    assert isinstance(res.exception, ConfigError), (res.output, res.exception)
    for w in words:
        assert w in str(res.exception), str(res.exception)
    return str(res.exception)


@pytest.mark.parametrize("point", ["checkpoint_epoch_1", "model.pt", "learning_curves"])
def test_kill_9_during_train_leaves_no_partial_file_and_no_usable_run(point, tmp_path):
    out = tmp_path / "t"
    proc = _start("train", *DATA, *BIG, "--epochs", "3", "--checkpoint-epochs", "1,2", "--out", out)
    _kill_when(proc, _temp_named(out, point))
    assert_every_final_file_complete(out)
    assert run_status(out) == "crashed"
    if (out / "model.pt").exists():
        refused(runner.invoke(app, ["influence", *DATA, "--checkpoint", str(out / "model.pt"), "--method", "loss",
                                    "--self", "--out", str(tmp_path / "x"), "--quiet"]), "did not finish")
    refused(runner.invoke(app, ["train", *DATA, "--out", str(out), "--quiet"]), "already holds a crashed")
    res = runner.invoke(
        app, ["train", *DATA, "--widths", "8", "--epochs", "2", "--overwrite", "--out", str(out), "--quiet"]
    )
    assert res.exit_code == 0 and run_status(out) == "finished"
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))


def test_kill_9_while_scores_fill_leaves_no_scores_file(tmp_path):
    model = tmp_path / "m"
    assert (
        runner.invoke(
            app, ["train", *DATA, "--widths", "64", "--epochs", "2", "--out", str(model), "--quiet"]
        ).exit_code
        == 0
    )
    out = tmp_path / "inf"
    proc = _start(
        "influence",
        *DATA,
        "--checkpoint",
        model / "model.pt",
        "--method",
        "grad-dot",
        "--memory-gb",
        "0.0001",
        "--out",
        out,
    )
    _kill_when(proc, _temp_named(out, "scores.npy"))
    assert not (out / "scores.npy").exists()  # the partly filled matrix never carries the final name
    assert_every_final_file_complete(out)
    assert run_status(out) == "crashed"


def test_kill_9_during_the_farm_then_resume_gives_the_uninterrupted_result(tmp_path):
    args = ["memorization", *DATA, "--widths", "16", "--epochs", "3", "--n-models", "6", "--chunk-size", "2",
            "--min-held-out", "1"]
    clean = tmp_path / "clean"
    assert runner.invoke(app, [*args, "--out", str(clean), "--quiet"]).exit_code == 0
    out = tmp_path / "mem"
    proc = _start(*args, "--out", out)
    _kill_when(proc, lambda: len(list(out.glob("store/*/chunks/*.npz"))) >= 1)
    assert_every_final_file_complete(out)
    assert run_status(out) == "crashed"
    refused(runner.invoke(app, [*args, "--out", str(out), "--quiet"]), "already holds a crashed", "--resume")
    res = runner.invoke(app, [*args, "--resume", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    np.testing.assert_array_equal(np.load(out / "memorization.npy"), np.load(clean / "memorization.npy"))


def test_damaged_chunks_are_trained_again_on_resume(tmp_path):
    args = ["memorization", *DATA, "--widths", "16", "--epochs", "2", "--n-models", "4", "--chunk-size", "2",
            "--min-held-out", "1"]
    out = tmp_path / "mem"
    assert runner.invoke(app, [*args, "--out", str(out), "--quiet"]).exit_code == 0
    first = np.load(out / "memorization.npy")
    chunks = sorted(out.glob("store/*/chunks/*.npz"))
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(chunks[1].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one bit-flipped byte: a CRC error
    chunks[1].write_bytes(bytes(flipped))
    res = runner.invoke(app, [*args, "--resume", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    np.testing.assert_array_equal(np.load(out / "memorization.npy"), first)


def test_damaged_snapshot_is_one_message(tmp_path):
    model = tmp_path / "m"
    assert runner.invoke(app, ["train", *DATA, "--widths", "8", "--epochs", "2", "--checkpoint-epochs", "1",
                               "--out", str(model), "--quiet"]).exit_code == 0
    snap = model / "checkpoint_epoch_1.pt"
    snap.write_bytes(snap.read_bytes()[:100])
    refused(
        runner.invoke(
            app,
            [
                "influence",
                *DATA,
                "--checkpoint",
                str(model / "model.pt"),
                "--method",
                "grad-dot",
                "--n-test",
                "3",
                "--out",
                str(tmp_path / "x"),
                "--quiet",
            ],
        ),
        "checkpoint_epoch_1.pt",
        "damaged",
    )


@pytest.mark.parametrize("command", ["train", "influence"])
def test_full_disk_is_one_message_and_leaves_no_partial_file(command, tmp_path):
    out = tmp_path / "full"
    if command == "train":
        proc = _start("train", *DATA, *BIG, "--epochs", "1", "--out", out, fsize=600_000)
    else:
        model = tmp_path / "m"
        assert runner.invoke(app, ["train", *DATA, "--widths", "8", "--epochs", "1", "--out", str(model),
                                   "--quiet"]).exit_code == 0
        proc = _start("influence", *DATA, "--checkpoint", model / "model.pt", "--method", "grad-dot",
                      "--memory-gb", "0.0001", "--out", out, fsize=50_000)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "File too large" in err and len(err.strip().splitlines()) == 1, err
    assert_every_final_file_complete(out)
    assert run_status(out) == "failed"
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert not (out / "model.pt").exists() and not (out / "scores.npy").exists()


def test_unwritable_out_is_one_message(tmp_path):
    if os.geteuid() == 0:  # root writes everywhere but in the kernel's file systems
        target = Path("/proc/modelsense-test/run")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        target = tmp_path / "ro" / "run"
    refused(runner.invoke(app, ["train", *DATA, "--widths", "8", "--epochs", "1", "--out", str(target), "--quiet"]),
            "cannot write --out")
