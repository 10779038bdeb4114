"""make_shards end to end on Ray (embedded, loopback): manifests, skipped files, resume, index files, sources."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import sources
from data_prep.make_shards import make_shards
from data_prep.shard_format import format_index, index_from_tar, parse_index, read_manifest, sha256_file
from tests.data_helpers import local_ray, photo, read_json, write_zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    classes, bad = write_zoo(root)
    return root, classes, bad


def test_embedded_ray_stays_on_loopback():
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_zoo_manifest_lists_every_bad_file_with_its_reason_and_keeps_the_rest(zoo, tmp_path):
    root, classes, bad = zoo
    manifest = make_shards(str(root), str(tmp_path), resolution=32, shard_size=7, workers=2, progress=False)
    on_disk = read_json(tmp_path / "manifest.json")
    assert on_disk["classes"] == sorted(classes) == manifest.classes
    assert on_disk["resolution"] == 32
    skipped = {s["path"]: s["reason"] for s in on_disk["skipped"]}
    assert set(skipped) == {p for p, _ in bad}
    for path, reason in bad:
        assert reason in skipped[path]
    n_files = sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert on_disk["num_samples"] == n_files - len(bad) == sum(s["count"] for s in on_disk["shards"])
    assert sum(on_disk["class_counts"]) == on_disk["num_samples"]
    for shard in on_disk["shards"]:
        tar = tmp_path / shard["name"]
        assert sha256_file(str(tar)) == shard["sha256"] and tar.stat().st_size == shard["bytes"]
        names = _members(tar)
        assert len(names) == 2 * shard["count"]
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls"}
        entries = parse_index((tmp_path / shard["index"]).read_text())
        assert len(entries) == shard["count"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # only finished files are left


def test_samples_are_decodable_rgb_squares_with_labels_matching_their_folder(zoo, tmp_path):
    root, classes, _ = zoo
    make_shards(str(root), str(tmp_path), resolution=24, shard_size=100, workers=1, progress=False)
    labels = Counter()
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".jpg"):
                img = Image.open(io.BytesIO(data))
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (24, 24))
            else:
                labels[int(data.decode("ascii"))] += 1
    counts = read_json(tmp_path / "manifest.json")["class_counts"]
    assert [labels[i] for i in range(len(classes))] == counts
    assert counts[1] == counts[2] == 4  # dog and øst-東 hold only good files


def test_every_shard_mixes_classes_in_a_seeded_order(tmp_path):
    a = make_shards("digits", str(tmp_path / "a"), resolution=8, shard_size=100, seed=3, workers=2,
                    limit_per_class=30, progress=False)
    b = make_shards("digits", str(tmp_path / "b"), resolution=8, shard_size=100, seed=3, workers=2,
                    limit_per_class=30, progress=False)
    c = make_shards("digits", str(tmp_path / "c"), resolution=8, shard_size=100, seed=4, workers=2,
                    limit_per_class=30, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # same seed, same bytes
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
    for shard in a.shards:
        with tarfile.open(tmp_path / "a" / shard.name) as tar:
            labels = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
        assert len(labels) >= 8  # 100 samples of 10 classes drawn at random


def test_rerun_keeps_verified_shards_and_rebuilds_only_damaged_ones(tmp_path):
    kw = dict(resolution=8, shard_size=40, workers=2, limit=160, progress=False)
    first = make_shards("digits", str(tmp_path), **kw)
    assert first.stats["shards_built"] == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}

    again = make_shards("digits", str(tmp_path), **kw)
    assert again.stats == {**again.stats, "shards_reused": 4, "shards_built": 0}
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")} == mtimes

    damaged = tmp_path / "shard-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[3000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / "shard-000002.json").unlink()  # as if killed before the commit marker
    (tmp_path / ".shard-000003.tar.tmp-0123abcd").write_bytes(b"leftover of a killed run")
    third = make_shards("digits", str(tmp_path), **kw)
    assert (third.stats["shards_reused"], third.stats["shards_built"]) == (2, 2)
    assert [s.sha256 for s in third.shards] == [s.sha256 for s in first.shards]  # rebuilt bit for bit
    assert (tmp_path / "shard-000000.tar").stat().st_mtime_ns == mtimes["shard-000000.tar"]
    assert not (tmp_path / ".shard-000003.tar.tmp-0123abcd").exists()

    changed = make_shards("digits", str(tmp_path), **{**kw, "resolution": 12})
    assert changed.stats["shards_built"] == 4  # other settings: nothing reusable
    fewer = make_shards("digits", str(tmp_path), **{**kw, "limit": 60})
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert fewer.num_samples == 60


def test_builtin_index_matches_wds2idx_and_dali_reads_it(tmp_path):
    make_shards("digits", str(tmp_path), resolution=8, shard_size=50, workers=1, limit=50, progress=False)
    tar, idx = tmp_path / "shard-000000.tar", tmp_path / "shard-000000.idx"
    with open(tar, "rb") as f:
        ours = format_index(index_from_tar(f))
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx is not installed")
    theirs = tmp_path / "theirs.idx"
    with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
        creator.create_index()
    assert ours == theirs.read_text() == idx.read_text()

    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import fn, pipeline_def, types

    own = tmp_path / "own.idx"
    own.write_text(ours)

    @pipeline_def(batch_size=50, num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=[str(tar)], index_paths=[str(own)], ext=["jpg", "cls"],
                                         missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), fn.pad(cls, fill_value=32)

    pipe = read()
    pipe.build()
    images, labels = pipe.run()
    assert all(np.asarray(images[i]).shape == (8, 8, 3) for i in range(50))
    got = sorted(int(bytes(np.asarray(labels[i])).decode().strip()) for i in range(50))
    with tarfile.open(tar) as t:
        want = sorted(int(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".cls"))
    assert got == want


def test_digits_and_mnist5k_sources(tmp_path):
    d = make_shards("digits", str(tmp_path / "digits"), resolution=16, shard_size=500, workers=2,
                    limit_per_class=20, progress=False)
    assert (d.num_samples, d.classes, d.class_counts) == (200, [str(i) for i in range(10)], [20] * 10)
    m = make_shards("mnist-5k", str(tmp_path / "mnist"), resolution=28, shard_size=500, workers=2,
                    limit_per_class=10, progress=False)
    assert (m.num_samples, m.resolution, m.num_classes, m.skipped) == (100, 28, 10, [])
    assert m.source == "mnist-5k"


def test_fashion_mnist_reads_the_debian_idx_files(tmp_path):
    try:
        src = sources.fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Debian package dataset-fashion-mnist is not installed: {e}")
    assert len(src) == 10_000 and src.pixels.shape == (10_000, 28, 28)
    m = make_shards("fashion-mnist", str(tmp_path), resolution=32, split="test", limit_per_class=5, workers=2,
                    progress=False)
    assert m.num_samples == 50 and m.classes[9] == "Ankle boot"


def test_idx_reader_handles_plain_and_gzip_files(tmp_path):
    import gzip
    import struct

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2, 3, 4) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(sources.read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(sources.read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError):
        sources.read_idx(tmp_path / "bad")


def test_max_side_shards_keep_aspect_ratio(tmp_path):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    photo(300, 150).save(src / "wide.jpg")
    m = make_shards(str(tmp_path / "src"), str(tmp_path / "out"), resolution=32, max_side=80, workers=1,
                    progress=False)
    assert m.max_side == 80
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        jpg = next(tar.extractfile(x).read() for x in tar.getmembers() if x.name.endswith(".jpg"))
    assert Image.open(io.BytesIO(jpg)).size == (80, 40)


def test_inline_mode_writes_the_same_shards_as_ray(tmp_path):
    kw = dict(resolution=8, shard_size=30, limit=60, progress=False)
    with_ray = make_shards("digits", str(tmp_path / "ray"), workers=2, **kw)
    inline = make_shards("digits", str(tmp_path / "inline"), workers=0, **kw)
    assert [s.sha256 for s in with_ray.shards] == [s.sha256 for s in inline.shards]


def test_cli_runs_as_a_module_on_the_cluster_at_ray_address(tmp_path):
    import ray

    # the module's embedded Ray stands in for a cluster: the CLI joins it instead of starting its own
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": gcs}
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.make_shards", "digits", str(out), "--resolution", "8", "--limit", "40",
         "--shard-size", "20", "--workers", "1", "--quality", "80", "--seed", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 40 and summary["shards"] == 2
    assert "img/s" in proc.stderr  # tqdm progress with rate
    manifest = read_manifest(str(out))
    assert (manifest.quality, manifest.seed) == (80, 5)

    missing = subprocess.run([sys.executable, "-m", "data_prep.make_shards", str(tmp_path / "nope"), str(out),
                              "--resolution", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not a folder" in missing.stderr
