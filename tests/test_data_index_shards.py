"""index_shards on shards the webdataset library wrote itself (.jpeg/.png images, .cls/.json labels, bad
samples, a truncated shard), then every backend and a short real training run on them, in place."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep.index_shards import BAD_SAMPLES_NAME, main
from pipeline.data import build_loader
from pipeline.data.backends import dali_available
from tests.data_helpers import corrupt_jpeg, id_color, ids_from_images, jpeg_bytes, png_bytes

CPU_BACKENDS = ["wds"] + (["dali-cpu"] if dali_available() else [])
N, BAD_JPEG, NOT_AN_IMAGE, BAD_LABEL = 40, 7, 12, 21


def _image(i: int, size: int, fmt: str) -> bytes:
    img = Image.new("RGB", (size + 8, size), id_color(i))  # not square: the loader crops the center
    return jpeg_bytes(img) if fmt == "jpeg" else png_bytes(img)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Two sets as other tools write them: ShardWriter with .jpeg + .cls, TarWriter with .png + .json."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "a").mkdir()
    with wds.ShardWriter(str(root / "a" / "train-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(N):
            sample = {"__key__": f"s{i:05d}", "jpeg": _image(i, 32, "jpeg"), "cls": i % 5}
            if i == BAD_JPEG:
                sample["jpeg"] = corrupt_jpeg(size=32)
            if i == NOT_AN_IMAGE:
                sample["jpeg"] = b"<html>404</html>"
            if i == BAD_LABEL:
                sample["cls"] = b"cat"
            sink.write(sample)
    (root / "b").mkdir()
    for s in range(2):
        with wds.TarWriter(str(root / "b" / f"part-{s}.tar")) as sink:
            for i in range(s * 20, s * 20 + 20):
                sink.write({"__key__": f"img{i:04d}", "png": _image(i, 32, "png"),
                            "json": json.dumps({"meta": {"label": i % 5}, "caption": "x"}).encode()})
    return root


def _all_ids(loader, epochs=1):
    ids, labels = [], []
    for _ in range(epochs * loader.batches_per_epoch):
        x, y = next(loader)
        assert x.shape[1:] == (3, 32, 32)
        ids += ids_from_images(x)
        labels += y.tolist()
    return ids, labels


def test_indexed_webdataset_shards_train_in_place_on_every_backend(foreign, tmp_path, capsys):
    out = tmp_path / "idx-a"
    assert main([str(foreign / "a" / "train-{000000..000003}.tar"), str(out), "--workers", "2", "--no-progress",
                 "--resolution", "32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == N - 3 and summary["shards"] == 4 and summary["bad"] == 3
    bad = [json.loads(line) for line in (out / BAD_SAMPLES_NAME).read_text().splitlines()]
    reasons = {b["key"]: b["reason"] for b in bad}
    assert set(reasons) == {f"s{i:05d}" for i in (BAD_JPEG, NOT_AN_IMAGE, BAD_LABEL)}
    assert "corrupt" in reasons[f"s{BAD_JPEG:05d}"] and "label" in reasons[f"s{BAD_LABEL:05d}"]
    assert all(b["shard"].endswith(".tar") for b in bad)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_keys"][:2] == ["jpg", "jpeg"] and "label_key" not in manifest  # cls: the default
    assert all(s["url"].startswith(str(foreign / "a")) for s in manifest["shards"])  # referenced in place
    assert not list(out.glob("*.tar"))  # nothing copied or re-encoded
    for backend in CPU_BACKENDS:
        with build_loader(str(out), batch_size=4, backend=backend, flip=False, drop_last=False) as loader:
            ids, labels = _all_ids(loader)
            assert loader.skipped == 0  # the bad ones never reach training
        good = set(range(N)) - {BAD_JPEG, NOT_AN_IMAGE, BAD_LABEL}
        assert set(ids) == good and labels == [i % 5 for i in ids]


def test_png_with_json_labels_and_a_truncated_shard(foreign, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for s in range(2):
        data = (foreign / "b" / f"part-{s}.tar").read_bytes()
        (broken / f"part-{s}.tar").write_bytes(data if s == 0 else data[: len(data) // 2])
    out = tmp_path / "idx-b"
    assert main([str(broken / "part-{0..1}.tar"), str(out), "--label-key", "json", "--label-field", "meta.label",
                 "--image-keys", "png", "--workers", "0", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = [s["count"] for s in manifest["shards"]]
    assert counts[0] == 20 and 0 < counts[1] < 20  # the samples before the cut are kept
    assert manifest["resolution"] == 32 and manifest["classes"] == ["0", "1", "2", "3", "4"]
    bad = [json.loads(line) for line in (out / BAD_SAMPLES_NAME).read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["key"] == "*" and "part-1.tar" in bad[0]["shard"]
    for backend in CPU_BACKENDS:  # PNG through DALI's decoder too
        with build_loader(str(out), batch_size=4, backend=backend, flip=False, drop_last=False) as loader:
            ids, labels = _all_ids(loader)
        assert set(ids) == set(range(20 + counts[1])) and labels == [i % 5 for i in ids]


def test_pipe_urls_stream_through_webdataset_gopen(foreign, tmp_path):
    out = tmp_path / "idx-pipe"
    pattern = f"pipe:cat {foreign / 'b'}/part-{{0..1}}.tar"
    assert main([pattern, str(out), "--label-key", "json", "--label-field", "meta.label", "--workers", "0",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["url"] for s in manifest["shards"]] == [f"pipe:cat {foreign / 'b'}/part-{i}.tar" for i in (0, 1)]
    with build_loader(str(out), batch_size=8, backend="wds", flip=False) as loader:  # range reads via the pipe
        ids, labels = _all_ids(loader)
    assert sorted(ids) == list(range(40)) and labels == [i % 5 for i in ids]


def test_bad_arguments_and_help(foreign, tmp_path, capsys):
    assert main([str(foreign / "a" / "nothing-{0..1}.tar"), str(tmp_path / "o"), "--workers", "0",
                 "--no-progress"]) == 1
    assert "no usable sample" in capsys.readouterr().err
    assert main([str(foreign / "b" / "part-0.tar"), str(tmp_path / "o"), "--label-key", "json"]) == 1
    assert "--label-field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "jpg;jpeg;png;webp" in capsys.readouterr().out


def test_a_short_training_run_on_indexed_shards(foreign, tmp_path):
    from tests.trainer_harness import make_trainer, tiny_config

    out = tmp_path / "idx-train"
    assert main([str(foreign / "a" / "train-{000000..000003}.tar"), str(out), "--workers", "0", "--no-progress"]) == 0
    cfg = tiny_config(tmp_path, str(out), 5, **{"train.steps": 4, "train.checkpoint_every": 4})
    trainer = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result["status"] == "finished" and result["step"] == 4
    assert trainer.loader.skipped == 0
    assert all(torch.isfinite(p).all() for p in trainer.G.parameters())


def test_webdataset_tar_members_are_where_the_index_says(foreign, tmp_path):
    """Offsets recorded from the stream point at the member bytes in the file (what range reads rely on)."""
    out = tmp_path / "idx-check"
    assert main([str(foreign / "b" / "part-0.tar"), str(out), "--label-key", "json", "--label-field",
                 "meta.label", "--workers", "0", "--no-progress"]) == 0
    from data_prep.shard_format import parse_index

    entries = parse_index((out / "index-000000.idx").read_text())
    data = (foreign / "b" / "part-0.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for e in entries:
            off, size = e.components["png"]
            assert data[off : off + size] == tar.extractfile(f"{e.key}.png").read()


def test_shards_on_s3_are_indexed_and_read_in_place(foreign, tmp_path):
    import fsspec

    from tests.data_helpers import moto_s3

    with moto_s3(tmp_path) as s3:
        opts, bucket = s3["options"], s3["bucket"]
        fs = fsspec.filesystem("s3", **opts)
        for p in sorted((foreign / "a").glob("train-*.tar")):
            fs.put_file(str(p), f"{bucket}/foreign/{p.name}")
        out = f"s3://{bucket}/foreign-index"
        from data_prep import index_shards as ix

        pattern = f"s3://{bucket}/foreign/train-{{000000..000003}}.tar"
        manifest = ix.index_shards(pattern, out, workers=0, storage_options=opts, progress=False)
        assert manifest.num_samples == N - 3 and all(s.url.startswith("s3://") for s in manifest.shards)
        assert fs.exists(f"{bucket}/foreign-index/{ix.BAD_SAMPLES_NAME}")
        with build_loader(out, storage_options=opts, batch_size=4, backend="wds", flip=False, drop_last=False) as loader:
            ids, labels = _all_ids(loader)
        assert set(ids) == set(range(N)) - {BAD_JPEG, NOT_AN_IMAGE, BAD_LABEL} and labels == [i % 5 for i in ids]
