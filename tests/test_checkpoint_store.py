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
