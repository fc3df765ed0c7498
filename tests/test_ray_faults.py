"""A Ray worker killed (SIGKILL) while it trains a chunk of the ground-truth store: the run either
completes (Ray retries the task on a new worker) or fails with one clear FarmError and completes when
run again (--resume), and the store then holds what an uninterrupted run stores.

The worker is found by its process title (`ray::_ray_task` while it runs our task) among the
descendants of this test process (Ray's local instance is started here), so no other process is touched.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelsense.data import DataConfig
from modelsense.models import ModelConfig
from modelsense.retraining.store import FarmError, RetrainRecipe, subset_jobs, train_jobs
from modelsense.training.config import TrainConfig

pytestmark = pytest.mark.slow

N = 300
#: about 5 s of training per chunk of one model on this project's CPU (the engine's batched-matmul MLP step;
#: a fresh worker adds its imports): long enough to be killed mid-training, also on a warm worker
RECIPE = RetrainRecipe(
    DataConfig("digits", n_train=N), ModelConfig("mlp", widths=(512, 512)), TrainConfig(epochs=800, bs=16)
)
TITLE = b"ray::_ray_task"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) each descendant worker seen running `_ray_task` for `after` seconds: the first
    only, or (`repeat`) every one until stopped."""

    def __init__(self, repeat: bool = False, after: float = 1.0, timeout: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.repeat, self.after, self.timeout = repeat, after, timeout
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        end = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < end:
            for pid in _descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if not title.startswith(TITLE):
                    first_seen.pop(pid, None)
                    continue
                seen = first_seen.setdefault(pid, time.monotonic())
                if time.monotonic() - seen >= self.after and pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    if not self.repeat:
                        return
            time.sleep(0.05)


def _tables_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in ("masks", "seeds"):
        np.testing.assert_array_equal(got[name], want[name])
    for name in got:
        if got[name].dtype.kind == "f":  # trained numbers: equal up to rounding, never to the last digit
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


JOBS = subset_jobs(N, 0.5, range(2))  # two chunks, one per Ray CPU


@pytest.fixture(scope="module")
def ray_clean(tmp_path_factory):
    """A local Ray instance (2 CPUs) and the tables of an uninterrupted run on it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds Ray's worker by its process title in /proc (Linux)")
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'modelsense[distributed]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any failure to start means: no Ray here
        pytest.skip(f"a local Ray instance cannot start here: {type(exc).__name__}: {exc}")
    try:
        yield train_jobs(RECIPE, JOBS, tmp_path_factory.mktemp("clean"), backend="ray", chunk_models=1, progress=False)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("repeat", [False, True], ids=["one-kill", "kills-until-retries-run-out"])
def test_a_killed_ray_worker_is_retried_or_resumed_to_the_uninterrupted_result(ray_clean, repeat, tmp_path):
    """One kill: Ray retries the task (or, if not, FarmError and --resume). Killing every attempt: a task
    runs out of its retries, FarmError says to resume, and the resumed run completes."""
    killer = WorkerKiller(repeat=repeat, after=0.3 if repeat else 1.0)
    killer.start()
    try:
        got = train_jobs(RECIPE, JOBS, tmp_path, backend="ray", chunk_models=1, progress=False)
        outcome = "completed (Ray retried the task)"
    except FarmError as err:
        assert "run again with --resume" in str(err) and "finished chunks" in str(err)
        outcome = f"FarmError ({str(err)[:80]}...), then resumed"
        killer.stop.set()
        killer.join()
        got = train_jobs(RECIPE, JOBS, tmp_path, backend="ray", chunk_models=1, progress=False)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no Ray worker ran a chunk long enough to be killed"
    print(f"{len(killer.killed)} worker(s) killed mid-chunk: {outcome}")
    if repeat:
        assert outcome.startswith("FarmError")
    _tables_equal(got, ray_clean)
    again = train_jobs(RECIPE, JOBS, tmp_path, backend="local", progress=False)  # everything is stored now
    _tables_equal(again, ray_clean)
