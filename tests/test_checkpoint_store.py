"""Checkpoints are whole or invisible; retention keeps what rollback and users need."""

import json
import os

import pytest

from pipeline.checkpoint import COMMIT_FILE, CheckpointStore, CorruptCheckpointError, digests


def _save(store: CheckpointStore, step: int, tmp_path, payload: bytes = b"weights") -> None:
    staged = tmp_path / f"staged-{step}"
    (staged / "g").mkdir(parents=True)
    (staged / "g" / "model.pt").write_bytes(payload * step)
    (staged / "trainer.pt").write_bytes(b"state")
    store.begin(step)
    store.publish(step, staged)
    store.commit(step, digests(staged), {"note": "x"})


def test_half_written_checkpoint_is_never_listed_or_loaded(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    _save(store, 10, tmp_path)
    # a crash after publishing but before COMMITTED: the .partial folder exists, nothing else
    staged = tmp_path / "staged-20"
    staged.mkdir()
    (staged / "trainer.pt").write_bytes(b"half")
    store.begin(20)
    store.publish(20, staged)
    assert [c.step for c in store.list()] == [10]
    assert store.latest().step == 10
    with pytest.raises(FileNotFoundError):
        store.get(20)
    # a folder with the final name but no COMMITTED (e.g. copied by hand) is not a checkpoint either
    os.makedirs(tmp_path / "ckpts" / "step-00000030")
    assert store.latest().step == 10
    # a COMMITTED that is itself torn is ignored
    bad = tmp_path / "ckpts" / "step-00000040"
    bad.mkdir()
    (bad / COMMIT_FILE).write_text('{"step": 40, "fil')
    assert store.latest().step == 10


def test_corrupted_file_fails_verification(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    _save(store, 5, tmp_path)
    info = store.latest()
    assert store.fetch(info, tmp_path / "dl") == tmp_path / "ckpts" / "step-00000005"
    target = tmp_path / "ckpts" / "step-00000005" / "g" / "model.pt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.fetch(info, tmp_path / "dl")
    target.write_bytes(b"short")
    with pytest.raises(CorruptCheckpointError, match="wrong size"):
        store.fetch(info, tmp_path / "dl")


def test_retention_keeps_last_k_newest_healthy_and_best(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    for step in range(10, 110, 10):
        _save(store, step, tmp_path)
    store.mark_healthy(20)
    store.mark_healthy(40)
    store.mark_best(30, 12.5)
    removed = store.apply_retention(keep_last=2)
    assert [c.step for c in store.list()] == [30, 40, 90, 100]
    assert sorted(removed) == [10, 20, 50, 60, 70, 80]
    assert store.newest_healthy().step == 40
    assert store.labels()["best"] == {"step": 30, "fid": 12.5, "metric": "fid"}


def test_forget_after_drops_the_abandoned_branch(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    for step in (10, 20, 30):
        _save(store, step, tmp_path)
    store.mark_healthy(10)
    store.mark_healthy(20)
    store.mark_best(30, 3.0)
    assert store.newest_healthy(before=20).step == 10
    store.forget_after(10)
    assert [c.step for c in store.list()] == [10]
    labels = store.labels()
    assert labels["healthy"] == [10] and labels["best"] is None


def test_commit_record_lists_sizes_and_checksums(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    _save(store, 7, tmp_path)
    meta = json.loads((tmp_path / "ckpts" / "step-00000007" / COMMIT_FILE).read_text())
    assert meta["step"] == 7 and meta["note"] == "x"
    assert meta["files"]["g/model.pt"]["size"] == len(b"weights") * 7
    assert len(meta["files"]["trainer.pt"]["sha256"]) == 64


def test_s3_store_round_trip_and_torn_upload_is_invisible(s3_server, tmp_path, monkeypatch):
    """Checkpoints on S3 (moto on 127.0.0.1): COMMITTED goes last, so a half upload is not a checkpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    s3_server.client().create_bucket(Bucket="ckpts")
    store = CheckpointStore("s3://ckpts/run-1/checkpoints")
    _save(store, 4, tmp_path)
    staged = tmp_path / "staged-8"
    staged.mkdir()
    (staged / "trainer.pt").write_bytes(b"half")
    store.begin(8)
    store.publish(8, staged)  # the crash happens here: no COMMITTED
    assert [c.step for c in store.list()] == [4]
    root = store.fetch(store.latest(), tmp_path / "download")
    assert (root / "g" / "model.pt").read_bytes() == b"weights" * 4
    store.mark_healthy(4)
    assert store.newest_healthy().step == 4


# -- never losing the good copy -------------------------------------------------------------------------------
def _three_labelled(tmp_path) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "ckpts"))
    for step in (10, 20, 30, 40, 50):
        _save(store, step, tmp_path)
    store.mark_healthy(20)
    store.mark_best(10, 4.0)
    return store


@pytest.mark.parametrize("damage", ["directory", "truncated", "not-an-object"])
def test_unreadable_labels_stop_retention_instead_of_deleting(tmp_path, damage):
    store = _three_labelled(tmp_path)
    labels = tmp_path / "ckpts" / "labels.json"
    good = labels.read_text()
    labels.unlink()
    if damage == "directory":  # a real read error that is not "not found" (root reads through permissions)
        labels.mkdir()
    else:
        labels.write_text(good[: len(good) // 2] if damage == "truncated" else "[20]")
    assert store.apply_retention(keep_last=1) == []
    assert [c.step for c in store.list()] == [10, 20, 30, 40, 50]
    # a label change made meanwhile neither overwrites the unreadable file nor is lost
    store.mark_healthy(40)
    assert labels.is_dir() if damage == "directory" else labels.read_text() != good
    assert 40 in store.labels()["healthy"] and store.labels()["best"]["step"] == 10  # what it last saw
    if labels.is_dir():
        labels.rmdir()
    labels.write_text(good)
    store.mark_best(20, 3.0)  # the next update that can read the file carries the waiting change too
    assert json.loads(labels.read_text())["healthy"] == [20, 40]
    assert store.apply_retention(keep_last=1) == [10, 30]


def test_missing_labels_mean_no_labels(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    for step in (1, 2, 3):
        _save(store, step, tmp_path)
    assert store.labels() == {"healthy": [], "best": None}
    assert store.apply_retention(keep_last=1) == [1, 2]


def test_unreadable_committed_stops_retention_and_is_quarantined_for_resume(tmp_path):
    store = _three_labelled(tmp_path)
    commit = tmp_path / "ckpts" / "step-00000050" / COMMIT_FILE
    commit.write_text(commit.read_text()[:40])  # torn
    assert store.apply_retention(keep_last=1) == []
    assert [c.step for c in store.list()] == [10, 20, 30, 40]
    seen = []
    assert store.newest_good(on_quarantine=lambda step, why: seen.append((step, why))).step == 40
    assert seen and seen[0][0] == 50 and "not valid JSON" in seen[0][1]
    (moved,) = (tmp_path / "ckpts" / "quarantine").iterdir()
    assert moved.name.startswith("step-00000050-") and "not valid JSON" in (moved / "QUARANTINED.txt").read_text()
    assert store.apply_retention(keep_last=1) == [30]  # readable again: retention goes on


def test_newest_good_skips_checkpoints_with_missing_or_torn_files(tmp_path):
    store = _three_labelled(tmp_path)
    (tmp_path / "ckpts" / "step-00000050" / "trainer.pt").unlink()
    with open(tmp_path / "ckpts" / "step-00000040" / "g" / "model.pt", "ab") as f:
        f.write(b"torn")
    assert store.newest_good().step == 30
    assert store.newest_good(healthy=True).step == 20
    assert store.newest_good(before=20).step == 10
    assert sorted(p.name[:13] for p in (tmp_path / "ckpts" / "quarantine").iterdir()) == ["step-00000040", "step-00000050"]


def test_every_file_and_folder_is_fsynced_before_committed(tmp_path, monkeypatch):
    """Record what reaches os.fsync (real files, real descriptors) and when COMMITTED gets written."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = CheckpointStore(str(tmp_path / "ckpts"))
    staged = tmp_path / "staged"
    (staged / "g" / "ckpt").mkdir(parents=True)
    (staged / "g" / "ckpt" / "model.pt").write_bytes(b"w" * 100)
    (staged / "trainer.pt").write_bytes(b"t")
    store.begin(3)
    store.publish(3, staged)
    before_commit = set(synced)
    store.commit(3, digests(staged))
    partial = str(tmp_path / "ckpts" / "step-00000003.partial")
    wanted = {f"{partial}/g/ckpt/model.pt", f"{partial}/trainer.pt", f"{partial}/g/ckpt", f"{partial}/g", partial}
    assert wanted - before_commit <= {f"{partial}/g", partial}  # parents of files: synced by commit, before it
    commit_at = next(i for i, p in enumerate(synced) if "COMMITTED" in p)
    assert wanted <= set(synced[:commit_at])
    assert str(tmp_path / "ckpts") in synced[commit_at:]  # the rename into place is durable too


def test_commit_records_the_digests_of_the_writers_not_a_reread(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "trainer.pt").write_bytes(b"written")
    store.begin(1)
    store.publish(1, staged)
    (tmp_path / "ckpts" / "step-00000001.partial" / "trainer.pt").write_bytes(b"rotted!")  # damaged in the store
    store.commit(1, digests(staged))
    with pytest.raises(CorruptCheckpointError, match="trainer.pt does not match its checksum"):
        store.fetch(store.get(1), tmp_path / "dl")
