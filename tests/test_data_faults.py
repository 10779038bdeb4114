"""Data faults in training, with real broken files: a corrupt JPEG in a shard make_shards did not write,
a truncated shard without an index, a shard deleted mid-run; quarantine agreed by two real ranks, the
budget, and resuming with the quarantine."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import process_group
from pipeline.data import build_loader
from pipeline.data.backends import dali_available
from pipeline.data.faults import DataFaultError
from tests.data_helpers import corrupt_jpeg, free_port, ids_from_images, write_id_shards

CPU_BACKENDS = ["wds"] + (["dali-cpu"] if dali_available() else [])


def _epoch(loader, n=None):
    return [next(loader) for _ in range(n if n is not None else loader.batches_per_epoch)]


def _rest_of_epoch(loader):
    epoch, out = loader.epoch, []
    while loader.epoch == epoch:
        out.append(next(loader))
    return out


def _ids(batches) -> list[int]:
    return [i for x, _ in batches for i in ids_from_images(x)]


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corrupt_jpeg_in_a_foreign_shard_is_skipped_not_fatal(tmp_path, backend, caplog):
    bad_id = 5
    write_id_shards(tmp_path, [12, 12], extra={bad_id: {"jpg": corrupt_jpeg()}})
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    with build_loader(str(tmp_path), batch_size=4, backend=backend, flip=False, shuffle_window=8) as loader:
        for epoch in range(2):
            batches = _epoch(loader)
            assert all(x.shape == (4, 3, 16, 16) and torch.isfinite(x).all() for x, _ in batches)
            ids = _ids(batches)
            assert bad_id not in ids and len(set(ids)) == 23  # the other 23 samples, one of them twice
            assert all(y.tolist() == [i % 5 for i in ids_from_images(x)] for x, y in batches)
            assert loader.skipped == epoch + 1
        assert list(loader.skipped_keys) == [f"shard-000000.tar/{bad_id:06d}"]
        if backend == "dali-cpu":  # DALI failed on it in epoch 0; epoch 1 knew it unless read ahead already
            assert loader._dali.rebuilds in (1, 2) and loader._dali_fallbacks == loader._dali.rebuilds
    assert f"shard-000000.tar/{bad_id:06d}" in caplog.text


def test_truncated_shard_without_index_is_quarantined_from_the_next_epoch(tmp_path, caplog):
    write_id_shards(tmp_path, [10, 10, 10, 10], index=False)
    _truncate(tmp_path / "shard-000002.tar")
    caplog.set_level(logging.ERROR, logger="pipeline.data")
    with build_loader(str(tmp_path), batch_size=4, backend="wds", shuffle_window=8) as loader:
        assert "shard-000002.tar is unreadable" in caplog.text  # found when scanning for the missing index
        first = _epoch(loader, 3)
        stats = loader.sync_faults(max_bad_fraction=0.3)  # 10 of 40 lost: within budget
        assert stats["data/bad_shards"] == 1 and loader.quarantine == {"shard-000002.tar": 1}
        rest = _rest_of_epoch(loader)  # epoch 0 keeps its schedule (its lost samples replaced) ...
        assert not set(_ids(first + rest)) & set(range(20, 30))
        assert loader.epoch == 1 and loader.batches_per_epoch == 30 // 4  # ... epoch 1 leaves the shard out
        ids = _ids(_epoch(loader))
        assert len(ids) == len(set(ids)) == 28 and not set(ids) & set(range(20, 30))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shard_deleted_mid_run_is_quarantined_and_training_goes_on(tmp_path, backend):
    write_id_shards(tmp_path, [16, 16, 16, 16])
    with build_loader(str(tmp_path), batch_size=4, backend=backend, shuffle_window=8, prefetch=1) as loader:
        order = loader.plan.rank_order(0, 0)
        victim = int(order[-1]) // 16  # a shard read late in the epoch, after the deletion
        head = _epoch(loader, 2)
        os.remove(tmp_path / f"shard-{victim:06d}.tar")
        tail = _rest_of_epoch(loader)
        assert len(head + tail) == 16 and loader.skipped > 0
        assert all(x.shape == (4, 3, 16, 16) for x, _ in tail)
        stats = loader.sync_faults(max_bad_fraction=0.25)
        assert stats["data/bad_shards"] == 1 and loader.quarantine == {f"shard-{victim:06d}.tar": 2}
        _rest_of_epoch(loader)  # epoch 1: still scheduled, replaced without reads
        ids = _ids(_rest_of_epoch(loader))  # epoch 2: gone from the schedule
        assert loader.epoch == 3 and len(ids) == len(set(ids)) == 48
        assert not set(ids) & set(range(16 * victim, 16 * victim + 16))


def test_past_max_bad_fraction_the_error_names_the_shards(tmp_path):
    write_id_shards(tmp_path, [10, 10, 10, 10], index=False)
    _truncate(tmp_path / "shard-000001.tar")
    with build_loader(str(tmp_path), batch_size=4, backend="wds") as loader:
        next(loader)
        with pytest.raises(DataFaultError, match=r"10 of 40 samples lost.*max_bad_fraction=0\.01.*shard-000001\.tar.*ReadError"):
            loader.sync_faults()  # the default budget: 1%


def test_resume_with_the_quarantine_continues_exactly_and_reads_nothing_bad(tmp_path):
    write_id_shards(tmp_path, [16, 16, 16, 16])
    kw = {"batch_size": 4, "backend": "wds", "shuffle_window": 8, "seed": 3}
    with build_loader(str(tmp_path), **kw) as a:
        a_order = a.plan.rank_order(0, 0)
        victim = int(a_order[-1]) // 16
        _epoch(a, 2)
        os.remove(tmp_path / f"shard-{victim:06d}.tar")
        _rest_of_epoch(a)
        _epoch(a, 3)
        a.sync_faults(max_bad_fraction=0.3)
        mid = a.state()  # in epoch 1, which still schedules the shard: the quarantine starts with epoch 2
        assert mid["quarantine"] == {f"shard-{victim:06d}.tar": 2} and json.loads(json.dumps(mid)) == mid
        want = _epoch(a, 16)  # across the epoch boundary
        late = a.state()
        want_late = _epoch(a, 3)
    for state, expected in ((mid, want), (late, want_late)):
        with build_loader(str(tmp_path), start_epoch=state["epoch"], start_offset=state["offset"],
                          quarantine=state["quarantine"], **kw) as b:
            got = _epoch(b, len(expected))
            assert all(torch.equal(x, y) and torch.equal(lx, ly) for (x, lx), (y, ly) in zip(got, expected))
            assert b.sync_faults(max_bad_fraction=0.3)["data/bad_shards"] == 1


def _two_ranks(rank: int, port: int, root: str, victim: int, out: str) -> None:
    process_group.join("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with build_loader(root, batch_size=4, rank=rank, world_size=2, backend="wds", shuffle_window=8,
                          prefetch=1) as loader:
            _epoch(loader, 2)
            dist.barrier()
            if rank == 0:
                os.remove(Path(root) / f"shard-{victim:06d}.tar")
            dist.barrier()
            _epoch(loader, 13)  # the rest of epoch 0: only rank 0 reads the victim
            mine = sorted(loader.shards.bad)
            stats = loader.sync_faults(max_bad_fraction=0.25)
            _rest_of_epoch(loader)
            ids = _ids(_rest_of_epoch(loader))
            Path(out, f"rank{rank}.json").write_text(json.dumps({
                "seen": mine, "quarantine": loader.quarantine, "stats": stats, "ids": ids,
                "batches": loader.plan_for(2).batches_per_epoch}))
    finally:
        process_group.leave()


def test_two_ranks_agree_on_a_shard_only_one_of_them_met(tmp_path):
    root = tmp_path / "shards"
    write_id_shards(root, [20] * 6)
    from pipeline.data.schedule import EpochPlan

    plan = EpochPlan((20,) * 6, 4, world_size=2, shuffle_window=8)
    victim = int(plan.rank_order(0, 0)[-1]) // 20
    assert victim not in {int(i) // 20 for i in plan.rank_order(0, 1)}  # rank 1 never reads it in epoch 0
    # spawn: a fork of this process (DALI and loader threads from other tests) could start locked
    mp.spawn(_two_ranks, args=(free_port(), str(root), victim, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["seen"] == [victim] and r1["seen"] == []
    name = f"shard-{victim:06d}.tar"
    assert r0["quarantine"] == r1["quarantine"] == {name: 2}  # met at the end of epoch 0: out from epoch 2
    assert r0["stats"] == r1["stats"] and r0["stats"]["data/bad_shards"] == 1
    assert r0["batches"] == r1["batches"] == 100 // 8  # epoch 2: 100 samples over 2 ranks x 4
    both = r0["ids"] + r1["ids"]
    assert len(both) == len(set(both)) == 96 and not set(both) & set(range(20 * victim, 20 * victim + 20))


def test_max_bad_fraction_is_range_checked():
    from pipeline import config as C

    cfg = C.RunConfig()
    cfg.data.max_bad_fraction = 1.5
    with pytest.raises(C.ConfigError, match=r"data\.max_bad_fraction.*\[0, 1\]"):
        C.validate(cfg)
    assert np.isclose(C.RunConfig().data.max_bad_fraction, 0.01)


def test_training_survives_a_vanished_shard_logs_data_metrics_and_resumes(tmp_path, mlflow_server):
    import uuid

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker
    from tests.trainer_harness import make_trainer, tiny_config

    shards = tmp_path / "shards"
    write_id_shards(shards, [24, 24, 24, 24], num_classes=5, resolution=32)
    over = {"train.steps": 6, "train.checkpoint_every": 6, "data.max_bad_fraction": 0.3}
    cfg = tiny_config(tmp_path, str(shards), 5, **over)
    tracker = Tracker(mlflow_server.uri, "data-faults", f"vanished-{uuid.uuid4().hex[:6]}", retry_wait=0.2)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    os.remove(shards / "shard-000001.tar")  # after the loader indexed it, before any read
    assert trainer.fit()["status"] == "finished"
    assert trainer.loader.quarantine == {"shard-000001.tar": 1}
    tracker.flush()
    client = MlflowClient(mlflow_server.uri)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "data/bad_shards")] == [1.0, 1.0, 1.0]
    assert client.get_metric_history(tracker.run_id, "data/skipped")[-1].value > 0
    tracker.close()

    # a restart (new process, same store) resumes with the quarantine and does not fault again
    cfg2 = tiny_config(tmp_path, str(shards), 5, **{**over, "train.steps": 10})
    resumed = make_trainer(cfg2, tmp_path)
    resumed.load_checkpoint(trainer.store.latest())
    assert resumed.loader.quarantine == {"shard-000001.tar": 1}
    assert resumed.fit()["status"] == "finished" and resumed.step == 10


def test_a_vanished_shard_past_the_budget_stops_training_naming_it_with_data_metrics_logged(tmp_path,
                                                                                             mlflow_server):
    """One of four shards is 25% of the set, past the default budget of 1%: the run stops with an error naming
    the shard, and the MLflow run says why (data/bad_shards = 1), not 0."""
    import uuid

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker
    from tests.trainer_harness import make_trainer, tiny_config

    shards = tmp_path / "shards"
    write_id_shards(shards, [24, 24, 24, 24], num_classes=5, resolution=32)
    cfg = tiny_config(tmp_path, str(shards), 5, **{"train.steps": 6, "train.checkpoint_every": 6})
    tracker = Tracker(mlflow_server.uri, "data-faults", f"over-{uuid.uuid4().hex[:6]}", retry_wait=0.2)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    os.remove(shards / "shard-000002.tar")
    with pytest.raises(DataFaultError, match=r"24 of 96 samples lost.*max_bad_fraction=0\.01.*shard-000002\.tar"):
        trainer.fit()
    assert tracker.flush(30)
    history = MlflowClient(mlflow_server.uri).get_metric_history(tracker.run_id, "data/bad_shards")
    assert [m.value for m in history][-1] == 1.0
    tracker.close()


@pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali")
def test_dali_batches_around_a_corrupt_jpeg_are_the_same_after_a_restart(tmp_path):
    """The first run learns the culprit in epoch 0 and leaves it out in epoch 1; a loader restarted at
    epoch 1 meets it afresh (DALI fails, the batch is repaired and decoded again): the same batches."""
    write_id_shards(tmp_path, [12, 12], extra={5: {"jpg": corrupt_jpeg()}, 17: {"jpg": corrupt_jpeg(1)}})
    kw = {"batch_size": 4, "backend": "dali-cpu", "shuffle_window": 8, "random_crop": True, "seed": 2}
    with build_loader(str(tmp_path), **kw) as a:
        _rest_of_epoch(a)
        assert a._dali.rebuilds == 2
        want = _rest_of_epoch(a)  # the culprits are known by now, unless epoch 1 was read ahead already
        assert 2 <= a._dali.rebuilds <= 4
    with build_loader(str(tmp_path), start_epoch=1, **kw) as b:
        got = _rest_of_epoch(b)
        assert b._dali.rebuilds == 2 and b.skipped == 2
    assert all(torch.equal(x, y) and torch.equal(lx, ly) for (x, lx), (y, ly) in zip(got, want))
    assert not {5, 17} & set(_ids(got))
