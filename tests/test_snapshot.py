"""Trainer checkpoints load weights only, and a bad newest checkpoint falls back to the previous good one.

A real trainer (ZeRO 1, two DeepSpeed engines) saves real checkpoints; the attacks are real pickle payloads
that would write a marker file if anything unpickled them with weights_only=False."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import COMMIT_FILE, CheckpointStore
from pipeline.sample import read_checkpoint
from pipeline.snapshot import UnsafeCheckpointError
from pipeline.tracking import Tracker
from tests.trainer_harness import make_trainer, run_two_rank_script, tiny_config

OVERRIDES = {"train.steps": 2, "train.checkpoint_every": 1, "optim.zero_stage": 1, "tricks.replay_size": 4}
ZERO_FILE = "d/ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt"
PLANTED = ["trainer.pt", "rank0.pt", "g/ckpt/mp_rank_00_model_states.pt", ZERO_FILE]


class Payload:
    """Unpickling this (weights_only=False) runs eval, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('pwned')",))


def plant(step_dir: Path, rel: str, marker: Path) -> None:
    """Replace a checkpoint file with a payload and rewrite COMMITTED to match, as an attacker who can write
    the prefix would."""
    path = step_dir / rel
    torch.save({"state": Payload(marker)}, path)
    meta = json.loads((step_dir / COMMIT_FILE).read_text())
    meta["files"][rel] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (step_dir / COMMIT_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, digits_shards):
    """Checkpoints at steps 1 and 2 of a real run, made once for the module."""
    shards, n = digits_shards
    root = tmp_path_factory.mktemp("saved-run")
    trainer = make_trainer(tiny_config(root, shards, n, **OVERRIDES), root)
    trainer.fit()
    assert [c.step for c in trainer.store.list()] == [1, 2]
    assert ZERO_FILE in trainer.store.get(2).meta["files"]
    return root / "ckpt"


def fresh_trainer(tmp_path, digits_shards, saved_run, **kwargs):
    shards, n = digits_shards
    shutil.copytree(saved_run, tmp_path / "ckpt")
    return make_trainer(tiny_config(tmp_path, shards, n, **OVERRIDES), tmp_path, **kwargs)


def test_planted_pickles_are_refused_naming_the_file_and_never_run(tmp_path, digits_shards, saved_run):
    marker = tmp_path / "marker"
    # the payload is live: an unsafe load runs it
    torch.save({"state": Payload(marker)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    trainer = fresh_trainer(tmp_path, digits_shards, saved_run)
    step_dir = tmp_path / "ckpt" / "step-00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(step_dir, pristine)
    for rel in PLANTED:
        plant(step_dir, rel, marker)
        with pytest.raises(UnsafeCheckpointError) as err:
            trainer.load_checkpoint(trainer.store.get(2))
        assert rel in str(err.value), err.value
        assert not marker.exists(), f"loading a planted {rel} ran its payload"
        shutil.rmtree(step_dir)
        shutil.copytree(pristine, step_dir)
    trainer.load_checkpoint(trainer.store.get(2))  # the untouched checkpoint loads
    assert trainer.step == 2

    # the exported EMA G, as sampling and evaluation read it
    plant(step_dir, "g_ema.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="g_ema.pt"):
        read_checkpoint(step_dir / "g_ema.pt")
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["planted-pickle", "bit-flip"])
def test_bad_newest_checkpoint_is_quarantined_and_the_previous_used(tmp_path, digits_shards, saved_run,
                                                                    mlflow_server, attack):
    tracker = Tracker(mlflow_server.uri, "t-quarantine", f"job-{attack}", retry_wait=0.2)
    trainer = fresh_trainer(tmp_path, digits_shards, saved_run, tracker=tracker)
    step_dir = tmp_path / "ckpt" / "step-00000002"
    marker = tmp_path / "marker"
    if attack == "planted-pickle":
        plant(step_dir, "trainer.pt", marker)
    else:  # same size, one byte different: only the checksum sees it
        path = step_dir / "g" / "ckpt" / "mp_rank_00_model_states.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    info = trainer.restore()
    assert info.step == 1 and trainer.step == 1
    assert not marker.exists()
    assert [c.step for c in trainer.store.list()] == [1]
    (moved,) = (tmp_path / "ckpt" / "quarantine").iterdir()
    reason = (moved / "QUARANTINED.txt").read_text()
    assert moved.name.startswith("step-00000002-")
    assert ("trainer.pt: refused to load" if attack == "planted-pickle" else "does not match its checksum") in reason
    assert tracker.flush(30)
    tags = MlflowClient(mlflow_server.uri).get_run(tracker.run_id).data.tags
    assert "checkpoint.quarantined.2" in tags
    tracker.close()
    # nothing good left before step 1: None, and nothing more is quarantined
    assert trainer.restore(before=1) is None
    assert len(list((tmp_path / "ckpt" / "quarantine").iterdir())) == 1


def test_each_rank_fetches_only_its_files_and_deletes_its_restore_folder(tmp_path, digits_shards, saved_run,
                                                                         s3_server, monkeypatch):
    """An S3 store (moto on 127.0.0.1): the download is trainer.pt, the rank file and the engines' files
    this rank loads; nothing of it stays on local disk."""
    for key, value in {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                       "AWS_DEFAULT_REGION": s3_server.region, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    s3_server.client().create_bucket(Bucket="snapshots")
    store = CheckpointStore("s3://snapshots/run/checkpoints")
    store.fs.put(str(saved_run / "step-00000002"), store.step_dir(2), recursive=True)
    info = store.get(2)
    assert {"d/zero_to_fp32.py", "g/latest", "g_ema.pt"} <= set(info.meta["files"])

    trainer = fresh_trainer(tmp_path, digits_shards, saved_run)
    trainer.store = store
    fetched = []
    real_get = store.fs.get_file
    monkeypatch.setattr(store.fs, "get_file", lambda src, dst, **kw: (fetched.append(src), real_get(src, dst, **kw)))
    trainer.load_checkpoint(info)
    assert trainer.step == 2
    got = sorted(src.split("step-00000002/", 1)[1] for src in fetched)
    assert got == sorted(["trainer.pt", "rank0.pt", "g/ckpt/mp_rank_00_model_states.pt",
                          "d/ckpt/mp_rank_00_model_states.pt", ZERO_FILE,
                          "g/ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    assert not (trainer.work_dir / "restore").exists()


def test_two_ranks_gather_digests_and_agree_to_fall_back_when_one_rank_finds_rot(tmp_path, digits_shards):
    """Two real processes: each rank's files are listed in COMMITTED with the digests it computed; rank 1 alone
    finds its ZeRO partition rotten, and both ranks quarantine it and restore the step before."""
    shards, n = digits_shards
    results = run_two_rank_script("tests.two_rank_snapshot", tmp_path, shards, n)
    for r in results:
        assert r["restored"] == 1 and r["step"] == 1 and not r["restore_dir_left"]
    files = results[0]["files"]
    (zero1,) = [f for f in files if f.startswith("d/") and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in f]
    assert {"rank0.pt", "rank1.pt"} <= set(files)
    (moved,) = (tmp_path / "ckpt" / "quarantine").iterdir()
    assert moved.name.startswith("step-00000002-")
    assert f"{Path(zero1).name} does not match its checksum" in (moved / "QUARANTINED.txt").read_text()
