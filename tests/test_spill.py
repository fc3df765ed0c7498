"""Spilled train-feature caches (`ComputeOptions.spill`, `attribution.base.scratch_buffer`).

With a memory budget far below the train features and several blocks of test rows, each block of
training features is computed once, written to a memory-mapped scratch file and read back on the
later passes; the scores equal the in-memory path and the recompute path (spill=False, or a disk
without room), and no scratch file is left behind, also when scoring fails half-way.
"""

import collections
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from modelsense.attribution import ComputeOptions, base, make_attributor
from modelsense.data import scratch
from modelsense.errors import ConfigError


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()  # P = 51
    g = torch.Generator().manual_seed(1)
    x = torch.randn(42, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (42,), generator=g)
    return net, x[:30].clone(), y[:30].clone(), x[30:].clone(), y[30:].clone()  # test rows in their own storage


NET, X, Y, XT, YT = _problem()
# 51 parameters x 8 bytes = 408 bytes a gradient: the 30 train gradients (12 kB) exceed budget/4 = 2 kB, the
# 12 test gradients (4.9 kB) too (no components-outer schedule): test blocks of 4 rows, train blocks of 2
TINY = 8000
SETTINGS = {"grad-dot": {"factored": False}, "if-ekfac": {"damping": 0.1}}


def _attributor(method, tmp_path, **compute):
    options = {"progress": False, "memory_budget": TINY, "scratch_dir": str(tmp_path), "spill": True, **compute}
    return make_attributor(method, **SETTINGS.get(method, {}), compute=ComputeOptions(**options)).fit(NET, X, Y)


def _reference(method):
    return make_attributor(method, **SETTINGS.get(method, {}), compute=ComputeOptions(progress=False)).fit(NET, X, Y)


def _count_train_features(att, monkeypatch):
    """Record the training rows of every `_train_features` call but the one-row probe."""
    calls = collections.Counter()
    original = att._train_features

    def spy(rows):
        if rows != slice(0, 1):
            calls[(rows.start, rows.stop)] += 1
        return original(rows)

    monkeypatch.setattr(att, "_train_features", spy)
    return calls


def _count_test_blocks(att, monkeypatch):
    calls = []
    original = att._test_features
    monkeypatch.setattr(att, "_test_features", lambda x, y: calls.append(len(y)) or original(x, y))
    return calls


def _spy_memmaps(monkeypatch):
    mapped = []
    original = scratch.open_map

    def spy(path, *args):
        mapped.append(os.path.basename(path))
        return original(path, *args)

    monkeypatch.setattr(scratch, "open_map", spy)
    return mapped


def _covers_all_rows(calls):
    rows = sorted(calls)
    return rows[0][0] == 0 and rows[-1][1] == len(X) and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


@pytest.mark.parametrize("method", ["grad-dot", "if-ekfac"])
def test_spilled_features_are_computed_once_per_training_block_and_give_the_same_scores(method, tmp_path,
                                                                                      monkeypatch):
    reference = _reference(method).scores(XT, YT)
    mapped = _spy_memmaps(monkeypatch)
    att = _attributor(method, tmp_path)
    calls, tests = _count_train_features(att, monkeypatch), _count_test_blocks(att, monkeypatch)
    got = att.scores(XT, YT)
    assert len(tests) > 1 and len(calls) > 1 and _covers_all_rows(calls)
    assert set(calls.values()) == {1}  # each training block computed once over all test blocks
    assert [name for name in mapped if name.startswith(f"features_{method}_")]  # the cache is a memory map
    assert not os.listdir(tmp_path)  # unlinked once mapped
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))


@pytest.mark.parametrize("method", ["grad-dot", "if-ekfac"])
def test_without_spill_features_are_recomputed_per_test_block_with_the_same_scores(method, tmp_path, monkeypatch):
    reference = _reference(method).scores(XT, YT)
    att = _attributor(method, tmp_path, spill=False)
    calls, tests = _count_train_features(att, monkeypatch), _count_test_blocks(att, monkeypatch)
    got = att.scores(XT, YT)
    assert len(tests) > 1 and _covers_all_rows(calls) and set(calls.values()) == {len(tests)}
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))


def test_a_full_disk_falls_back_to_recomputing_with_the_same_scores(tmp_path, monkeypatch):
    reference = _reference("if-ekfac").scores(XT, YT)
    att = _attributor("if-ekfac", tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=base.SCRATCH_DISK_MARGIN))
    mapped = _spy_memmaps(monkeypatch)
    calls, tests = _count_train_features(att, monkeypatch), _count_test_blocks(att, monkeypatch)
    got = att.scores(XT, YT)
    assert not mapped and len(tests) > 1 and set(calls.values()) == {len(tests)}
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))


def test_scratch_buffer_in_memory_on_disk_or_none(tmp_path, monkeypatch):
    small = base.scratch_buffer((3, 4), torch.float64, 96, str(tmp_path), zero=True)
    assert small.shape == (3, 4) and not small.any() and not os.listdir(tmp_path)
    mapped = _spy_memmaps(monkeypatch)
    spilled = base.scratch_buffer((3, 4), torch.float32, 47, str(tmp_path), prefix="probe")
    assert spilled.dtype == torch.float32 and not spilled.any() and mapped and mapped[0].startswith("probe_")
    spilled[1] = 2.0
    assert float(spilled.sum()) == 8.0 and not os.listdir(tmp_path)
    assert base.scratch_buffer((3, 4), torch.float32, 47, str(tmp_path), disk=False) is None
    assert base.scratch_buffer((3, 4), torch.float32, 47, str(tmp_path / "absent")) is None
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=base.SCRATCH_DISK_MARGIN + 47))
    assert base.scratch_buffer((3, 4), torch.float32, 47, str(tmp_path)) is None  # 48 bytes + the margin


def test_no_scratch_file_is_left_when_scoring_fails(tmp_path, monkeypatch):
    att = _attributor("grad-dot", tmp_path, memory_budget=2000)  # the score matrix (2880 bytes) is a memory map too
    mapped = _spy_memmaps(monkeypatch)
    original = att._test_features

    def fail_on_the_second_block(x, y):
        if len(tests) == 1:  # the first pass has filled the cache
            raise RuntimeError("interrupted mid-scoring")
        tests.append(len(y))
        return original(x, y)

    tests = []
    monkeypatch.setattr(att, "_test_features", fail_on_the_second_block)
    with pytest.raises(RuntimeError, match="interrupted mid-scoring"):
        att.scores(XT, YT)
    assert any(n.startswith("features_grad-dot_") for n in mapped) and any(n.startswith("scores_grad") for n in mapped)
    assert not os.listdir(tmp_path)
    monkeypatch.undo()
    got = att.scores(XT, YT)  # the score matrix, the result, stays as a file; the feature cache does not
    assert os.listdir(tmp_path) == [att.scores_path_.name]
    torch.testing.assert_close(torch.from_numpy(np.load(att.scores_path_)), got)


@pytest.mark.parametrize("method", ["grad-dot", "if-ekfac"])
def test_by_module_spills_once_per_training_block(method, tmp_path, monkeypatch):
    reference = _reference(method).scores(XT, YT, by_module=True)
    att = _attributor(method, tmp_path, block_size=4)
    calls, tests = _count_train_features(att, monkeypatch), _count_test_blocks(att, monkeypatch)
    parts = att.scores(XT, YT, by_module=True)
    assert len(tests) > 1 and _covers_all_rows(calls) and set(calls.values()) == {1}
    assert list(parts) == list(reference) and not os.listdir(tmp_path)
    for name, part in parts.items():
        torch.testing.assert_close(part, reference[name], rtol=1e-6, atol=1e-9 * float(reference[name].abs().max()))


def _trak(tmp_path, **compute):
    options = {"progress": False, "memory_budget": 1600, "scratch_dir": str(tmp_path), **compute}
    return make_attributor("trak", n_models=1, include_fitted=True, proj_dim=8,
                           compute=ComputeOptions(**options)).fit(NET, X, Y)


def _count_train_projections(att, monkeypatch):
    """Calls of `_loss_projections` on training rows (views of x_train_) and on test rows."""
    calls = collections.Counter()
    original = att._loss_projections

    def spy(m, x, y):
        train = x.untyped_storage().data_ptr() == att.x_train_.untyped_storage().data_ptr()
        calls["train" if train else "test"] += 1
        return original(m, x, y)

    monkeypatch.setattr(att, "_loss_projections", spy)
    return calls


def test_trak_projections_spill_in_fit_and_are_not_recomputed_at_scoring(tmp_path, monkeypatch):
    # ψ: 30 x 8 doubles = 1920 bytes > budget/4 = 400; the test side (12 x 64 = 768 bytes) too: test blocks of 6 rows
    reference = make_attributor("trak", n_models=1, include_fitted=True, proj_dim=8,
                                compute=ComputeOptions(progress=False)).fit(NET, X, Y).scores(XT, YT)
    mapped = _spy_memmaps(monkeypatch)
    spilled = _trak(tmp_path)
    assert [n for n in mapped if n.startswith("projections_trak_")] and not os.listdir(tmp_path)
    calls = _count_train_projections(spilled, monkeypatch)
    got = spilled.scores(XT, YT)
    assert calls["train"] == 0 and calls["test"] > 1
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))

    recomputing = _trak(tmp_path, spill=False)
    assert recomputing.train_projections_ == [None]
    calls = _count_train_projections(recomputing, monkeypatch)
    got = recomputing.scores(XT, YT)
    assert calls["train"] > calls["test"] > 1  # every training block once per test block
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))


def test_a_saved_state_loads_under_another_spill_value(tmp_path):
    (tmp_path / "scratch").mkdir()
    att = _trak(tmp_path / "scratch")
    att.save(tmp_path / "state")
    other = make_attributor("trak", n_models=1, include_fitted=True, proj_dim=8,
                            compute=ComputeOptions(progress=False, spill=False)).load(tmp_path / "state", NET, X, Y)
    torch.testing.assert_close(other.scores(XT, YT), att.scores(XT, YT), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0, "Auto"])
def test_a_bad_spill_value_is_refused(value):
    with pytest.raises(ConfigError, match=r"spill must be True, False or 'auto' .*received"):
        ComputeOptions(spill=value)
    with pytest.raises(ConfigError, match="spill must be True, False or 'auto'"):
        make_attributor("grad-dot", spill=value)
    assert ComputeOptions(spill=np.bool_(False)).spill is False and ComputeOptions().spill == "auto"


def test_spill_pays_when_the_saved_computations_outweigh_writing_and_reading():
    assert base.spill_pays(1.0, 0.1, passes=2) and base.spill_pays(1.0, 0.6, passes=5)
    assert not base.spill_pays(1.0, 0.6, passes=2) and not base.spill_pays(1.0, 1.0, passes=100)
    assert not base.spill_pays(1.0, 0.0, passes=1)


@pytest.mark.parametrize("pays", [True, False])
def test_auto_spill_follows_the_timings_of_the_blocks_written(pays, tmp_path, monkeypatch):
    reference = _reference("if-ekfac").scores(XT, YT)
    timings = []
    monkeypatch.setattr(base, "spill_pays", lambda c, w, passes: timings.append((c, w, passes)) or pays)
    att = _attributor("if-ekfac", tmp_path, spill="auto")
    calls, tests = _count_train_features(att, monkeypatch), _count_test_blocks(att, monkeypatch)
    got = att.scores(XT, YT)
    first = min(calls)
    assert len(timings) == (len(calls) if pays else 1)  # decided after each block written, on the totals
    assert timings[0][2] == len(tests) > 1 and timings[0][0] > 0 and timings[0][1] >= 0
    assert all(c >= c0 and w >= w0 for (c0, w0, _), (c, w, _) in zip(timings, timings[1:]))
    assert calls[first] == 1  # written before the decision, read back
    assert set(n for rows, n in calls.items() if rows != first) == ({1} if pays else {len(tests)})
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))


def test_spilled_rows_mapped_a_few_at_a_time_give_the_same_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "MAPPED_BYTES", 500)  # one 408-byte gradient row (ψ: 7 rows of 64 bytes) at a time
    reference = _reference("if-ekfac").scores(XT, YT)
    got = _attributor("if-ekfac", tmp_path).scores(XT, YT)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))
    reference = make_attributor("trak", n_models=1, include_fitted=True, proj_dim=8,
                                compute=ComputeOptions(progress=False)).fit(NET, X, Y).scores(XT, YT)
    att = _trak(tmp_path)
    got = att.scores(XT, YT)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))
    assert os.listdir(tmp_path) == [att.scores_path_.name]  # the (N, M) result, above the budget; no cache


@pytest.mark.parametrize("through", ["file", "mapping"])
def test_rows_written_and_read_back_through_the_file_or_the_mapping(through, tmp_path):
    buffer = base.scratch_buffer((64, 1024), torch.float32, 0, str(tmp_path))  # 4 kB rows: whole pages
    if through == "mapping":  # platforms without os.pread / os.pwrite
        del buffer._scratch_file
    values = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    base.write_rows(buffer, slice(0, 64), [values[:, :1000], values[:, 1000:]])
    base.release_rows(buffer, slice(0, 64))
    torch.testing.assert_close(base.read_rows(buffer, slice(3, 40), "cpu"), values[3:40], rtol=0, atol=0)


def test_the_spill_file_descriptor_closes_with_its_buffer(tmp_path):
    buffer = base.scratch_buffer((8, 4), torch.float32, 0, str(tmp_path), prefix="probe")
    fd = buffer._scratch_file[0]
    os.fstat(fd)  # open while the buffer lives
    del buffer
    import gc

    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert not os.listdir(tmp_path)
