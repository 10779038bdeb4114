"""Shards written to and streamed from S3 (moto_server on 127.0.0.1), as from local disk."""

from __future__ import annotations

import fsspec
import pytest
import torch

from data_prep.make_shards import make_shards
from pipeline.data import build_loader, read_manifest
from pipeline.data.backends import dali_available
from tests.data_helpers import local_ray, moto_s3

BACKENDS = ["wds"] + (["dali-cpu"] if dali_available() else [])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


def test_s3_round_trip_write_resume_and_stream(s3, tmp_path):
    opts, url = s3["options"], f"s3://{s3['bucket']}/sets/digits"
    with local_ray(num_cpus=2):  # Ray workers write to S3 with the options they are handed
        first = make_shards("digits", url, resolution=16, shard_size=50, limit=120, workers=2, storage_options=opts,
                            progress=False)
        again = make_shards("digits", url, resolution=16, shard_size=50, limit=120, workers=2, storage_options=opts,
                            progress=False)
    assert first.stats["shards_built"] == 3 and again.stats["shards_reused"] == 3  # verified by checksum
    fs = fsspec.filesystem("s3", **opts)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3['bucket']}/sets/digits", detail=False))
    assert names == ["manifest.json"] + [f"shard-{i:06d}.{ext}" for i in range(3) for ext in ("idx", "json", "tar")]
    assert read_manifest(url, opts)["num_samples"] == 120

    local = tmp_path / "copy"
    fs.get(f"{s3['bucket']}/sets/digits/", str(local), recursive=True)
    for backend in BACKENDS:
        kw = dict(batch_size=16, backend=backend, seed=3, random_crop=True, world_size=2, rank=1)
        with build_loader(url, storage_options=opts, **kw) as remote, build_loader(str(local), **kw) as disk:
            assert remote.batches_per_epoch == disk.batches_per_epoch == 3
            for _ in range(5):  # across an epoch boundary
                (xr, yr), (xd, yd) = next(remote), next(disk)
                assert torch.equal(xr, xd) and torch.equal(yr, yd)
            state = remote.state()
            expected = next(remote)
        with build_loader(url, storage_options=opts, start_epoch=state["epoch"], start_offset=state["offset"],
                          **kw) as resumed:
            got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
