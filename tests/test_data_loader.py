"""The loader contract, held to every backend available here: shapes, ranges, ranks, resume, parity, bad data."""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import pytest
import torch

from pipeline.data import EpochPlan, build_loader, pick_backend, read_manifest
from pipeline.data.backends import dali_available
from tests.data_helpers import ids_from_images, jpeg_bytes, photo, write_id_shards

CPU_BACKENDS = ["wds"] + (["dali-cpu"] if dali_available() else [])
COUNTS = [37, 41, 29, 45]  # 152 samples in uneven shards


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("id-shards")
    write_id_shards(out, COUNTS, num_classes=5, resolution=16)
    return str(out)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _ids(batches):
    return [i for x, _ in batches for i in ids_from_images(x)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batches_honour_the_contract(id_shards, backend):
    with build_loader(id_shards, batch_size=8, backend=backend, seed=1) as loader:
        assert loader.backend == backend
        assert (loader.num_classes, loader.class_names[:2], loader.resolution) == (5, ["class0", "class1"], 16)
        assert loader.batches_per_epoch == sum(COUNTS) // 8
        x, y = next(loader)
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (8,) and y.dtype == torch.int64
        assert -1.0 <= x.min() and x.max() <= 1.0
        ids = ids_from_images(x)
        assert y.tolist() == [i % 5 for i in ids]  # every image arrives with its own label
        assert loader.state() == {"epoch": 0, "offset": 1}


def test_auto_picks_dali_on_cpu_when_it_imports():
    assert pick_backend("auto", torch.device("cpu")) == ("dali-cpu" if dali_available() else "wds")
    with pytest.raises(ValueError):
        pick_backend("pytorch", torch.device("cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_ranks_read_disjoint_equal_slices_for_three_epochs(id_shards, backend):
    b = 8
    loaders = [build_loader(id_shards, batch_size=b, rank=r, world_size=2, backend=backend, seed=7) for r in (0, 1)]
    bpe = loaders[0].batches_per_epoch
    assert bpe == loaders[1].batches_per_epoch == sum(COUNTS) // (2 * b)
    per_epoch = []
    for epoch in range(3):
        ids = [_ids(_take(loader, bpe)) for loader in loaders]
        assert all(loader.state() == {"epoch": epoch + 1, "offset": 0} for loader in loaders)
        assert len(ids[0]) == len(ids[1]) == bpe * b
        assert len(set(ids[0])) == len(ids[0]) and len(set(ids[1])) == len(ids[1])  # no repeats in an epoch
        assert not set(ids[0]) & set(ids[1])  # ranks disjoint
        per_epoch.append(ids)
    assert per_epoch[0][0] != per_epoch[1][0]  # reshuffled every epoch
    for loader in loaders:
        loader.close()


def test_schedule_is_disjoint_and_complete_for_many_world_sizes():
    for world in (1, 2, 3, 4, 8):
        plan = EpochPlan(tuple(COUNTS), batch_size=4, world_size=world, seed=3, shuffle_window=16)
        for epoch in range(3):
            orders = [plan.rank_order(epoch, r) for r in range(world)]
            flat = np.concatenate(orders)
            assert len(flat) == len(set(flat.tolist())) == world * plan.batches_per_epoch * 4
            assert len(flat) > sum(COUNTS) - world * 4  # drop_last loses less than one step
        padded = EpochPlan(tuple(COUNTS), batch_size=4, world_size=world, drop_last=False)
        flat = np.concatenate([padded.rank_order(0, r) for r in range(world)])
        assert set(flat.tolist()) == set(range(sum(COUNTS)))  # wrap-around padding: every sample is seen
        assert len(flat) == world * padded.batches_per_epoch * 4


def test_drop_last_false_pads_with_full_batches(id_shards):
    with build_loader(id_shards, batch_size=10, world_size=3, rank=2, drop_last=False, backend="wds") as loader:
        assert loader.batches_per_epoch == -(-sum(COUNTS) // 30)
        assert all(x.shape[0] == 10 for x, _ in _take(loader, loader.batches_per_epoch))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_seed_same_stream_other_seed_other_stream(id_shards, backend):
    def first(seed):
        with build_loader(id_shards, batch_size=8, backend=backend, seed=seed, random_crop=True) as loader:
            return torch.cat([x for x, _ in _take(loader, 3)])

    a, b, c = first(5), first(5), first(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("stop_at", [3, 18, 19])  # mid-epoch, the last batch of epoch 0, the first of epoch 1
def test_resume_from_state_continues_exactly(id_shards, backend, stop_at):
    kw = dict(batch_size=8, rank=1, world_size=2, backend=backend, seed=11, random_crop=True, flip=True)
    with build_loader(id_shards, **kw) as loader:
        assert loader.batches_per_epoch == 9
        _take(loader, stop_at)
        state = loader.state()
        assert state == {"epoch": stop_at // 9, "offset": stop_at % 9}
        expected = _take(loader, 12)
    with build_loader(id_shards, start_epoch=state["epoch"], start_offset=state["offset"], **kw) as resumed:
        got = _take(resumed, 12)
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_offset_past_the_epoch_end_is_the_next_epoch(id_shards):
    with build_loader(id_shards, batch_size=8, backend="wds", start_epoch=2, start_offset=19) as loader:
        assert loader.state() == {"epoch": 3, "offset": 0}


@pytest.mark.skipif(len(CPU_BACKENDS) < 2, reason="DALI is not installed: only the wds backend runs here")
@pytest.mark.parametrize("aug", [dict(flip=False), dict(flip=True), dict(flip=True, random_crop=True, resolution=12)])
def test_backends_agree(id_shards, tmp_path, aug):
    # images with detail (not flat colours) so crops, flips and resizes show up in the pixels
    out = tmp_path / "photos"
    write_id_shards(out, [24, 24], resolution=32)
    for shards in (id_shards, str(out)):
        got = {}
        for backend in CPU_BACKENDS:
            with build_loader(shards, batch_size=8, backend=backend, seed=2, **aug) as loader:
                got[backend] = _take(loader, 4)
        ref = got["wds"]
        for backend, batches in got.items():
            for (xr, yr), (xb, yb) in zip(ref, batches):
                assert xb.shape == xr.shape and xb.dtype == xr.dtype
                assert torch.equal(yr, yb)  # the same samples in the same order
                diff = (xr - xb).abs()
                if "resolution" in aug:  # resize filters differ slightly
                    assert diff.mean() < 0.01 and diff.max() < 0.2, backend
                else:  # the same libjpeg decode: practically identical
                    assert diff.max() < 2 / 255, backend


def test_flip_mirrors_exactly_the_images_the_schedule_says(tmp_path):
    out = tmp_path / "asym"
    write_id_shards(out, [16], resolution=16)
    plain = _take(build_loader(str(out), batch_size=8, flip=False, backend="wds", seed=4), 1)[0][0]
    flipped = _take(build_loader(str(out), batch_size=8, flip=True, backend="wds", seed=4), 1)[0][0]
    plan = EpochPlan((16,), batch_size=8, seed=4, flip=True)
    flags = plan.aug_params(0, 0, 0).flip
    for i, f in enumerate(flags):
        assert torch.equal(flipped[i], plain[i].flip(-1) if f else plain[i])


def test_random_crop_from_max_side_shards_gives_squares(tmp_path):
    from data_prep.make_shards import make_shards

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(6):
            photo(90 + 10 * i, 50, seed=i).save(src / c / f"{i}.jpg")
    make_shards(str(src), str(tmp_path / "out"), resolution=24, max_side=64, workers=0, progress=False)
    for backend in CPU_BACKENDS:
        with build_loader(str(tmp_path / "out"), batch_size=4, random_crop=True, backend=backend) as loader:
            x, y = next(loader)
            assert x.shape == (4, 3, 24, 24) and set(y.tolist()) <= {0, 1}


def test_resolution_can_differ_from_the_manifest(id_shards):
    with build_loader(id_shards, batch_size=4, resolution=8, backend="wds") as loader:
        assert next(loader)[0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, backend, caplog):
    good = jpeg_bytes(photo(16, 16))
    bad = {
        2: {"jpg": good[: len(good) // 2]},  # truncated
        5: {"jpg": b"GIF89a not a jpeg"},
        9: {"cls": b"seven"},
        11: {"cls": b"99"},  # label outside the classes
    }
    out = tmp_path / "bad"
    write_id_shards(out, [10, 10], num_classes=5, extra=bad)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    with build_loader(str(out), batch_size=5, backend=backend, flip=False) as loader:
        batches = _take(loader, loader.batches_per_epoch)
        assert all(x.shape == (5, 3, 16, 16) for x, _ in batches)
        assert loader.skipped == 4
        keys = loader.skipped_keys
    assert set(keys) == {"shard-000000.tar/000002", "shard-000000.tar/000005", "shard-000000.tar/000009",
                         "shard-000001.tar/000011"}
    assert "truncated" in keys["shard-000000.tar/000002"].lower() and "outside" in keys["shard-000001.tar/000011"]
    assert "shard-000000.tar/000005" in caplog.text
    for x, y in batches:  # substitutes are real samples of the same batch, with their own labels
        ids = ids_from_images(x)
        assert not set(ids) & set(bad) and y.tolist() == [i % 5 for i in ids]


def test_jpeg_that_only_pil_can_tell_is_broken_is_skipped_by_wds(tmp_path):
    good = bytearray(jpeg_bytes(photo(16, 16)))
    sos = good.index(b"\xff\xda")
    broken = bytes(good[: sos + 2]) + b"\xff\xd9"  # markers intact, no scan data
    out = tmp_path / "subtle"
    write_id_shards(out, [8], extra={3: {"jpg": broken}})
    with build_loader(str(out), batch_size=8, backend="wds") as loader:
        next(loader)
        assert list(loader.skipped_keys) == ["shard-000000.tar/000003"]


def test_shards_without_index_files_are_scanned(tmp_path, id_shards):
    out = tmp_path / "noidx"
    write_id_shards(out, COUNTS, num_classes=5, index=False)
    assert all(s["index"] is None for s in read_manifest(str(out))["shards"])
    with build_loader(str(out), batch_size=8, seed=1, backend="wds") as a, \
            build_loader(id_shards, batch_size=8, seed=1, backend="wds") as b:
        assert torch.equal(next(a)[0], next(b)[0])


def test_loader_threads_stop_on_close_and_on_garbage_collection(id_shards):
    def producers():
        return [t for t in threading.enumerate() if t.name.startswith("shard-producer")]

    before = len(producers())
    loader = build_loader(id_shards, batch_size=8, backend="wds")
    next(loader)
    assert len(producers()) == before + 1
    loader.close()
    assert len(producers()) == before
    with pytest.raises(RuntimeError):
        next(loader)

    dropped = build_loader(id_shards, batch_size=8, backend="wds")
    next(dropped)
    thread = producers()[-1]
    del dropped
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_dropped_loaders_finalizer_takes_no_lock(id_shards):
    """The collector runs the finalizer on whatever thread it interrupts: once inside the decode pool's own submit,
    which holds that pool's shutdown lock and the lock every pool's submit takes, so a finalizer that shut the pool
    down hung the whole process (CI, test_same_seed_same_stream_other_seed_other_stream). Held here on purpose."""
    import concurrent.futures.thread as pool_module

    loader = build_loader(id_shards, batch_size=8, backend="wds")
    next(loader)
    producer = loader._stream.producer
    done = threading.Event()

    def collect_inside_submit():  # what the interrupted thread holds when the collector calls the finalizer
        with loader._pil.pool._shutdown_lock, pool_module._global_shutdown_lock:
            loader._finalizer()
        done.set()

    threading.Thread(target=collect_inside_submit, daemon=True).start()
    assert done.wait(timeout=10), "the finalizer blocked on a lock its thread holds"
    producer.join(timeout=5)  # the producer saw the flag and stopped on its own thread
    assert not producer.is_alive()
    loader.close()


def test_too_small_a_set_for_one_step_is_an_error(id_shards):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(id_shards, batch_size=100, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dali-gpu needs a CUDA GPU")
def test_dali_gpu_matches_dali_cpu(id_shards):
    with build_loader(id_shards, batch_size=8, backend="dali-gpu", device="cuda", seed=3) as gpu, \
            build_loader(id_shards, batch_size=8, backend="dali-cpu", seed=3) as cpu:
        assert gpu.backend == "dali-gpu"
        for _ in range(3):
            (xg, yg), (xc, yc) = next(gpu), next(cpu)
            assert xg.device.type == "cuda" and yg.device.type == "cuda"
            assert torch.equal(yg.cpu(), yc)
            assert (xg.cpu() - xc).abs().mean() < 0.02  # nvJPEG vs libjpeg-turbo
