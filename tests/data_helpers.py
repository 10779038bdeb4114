"""Helpers for the data tests: images made with PIL (good ones and a zoo of bad ones), shard sets whose
images encode their own sample id, an embedded loopback Ray, and an S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.shard_format import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    format_index,
    index_from_tar,
    sha256_file,
)
from pipeline.loopback import free_port

# -- images --------------------------------------------------------------------------------------------------


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth RGB picture with some texture (JPEG-friendly, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.02, 0.15, 3)
    arr = np.stack([base[c] / 2 + 60 * np.sin(xx * freq[c] + yy * freq[(c + 1) % 3]) for c in range(3)], -1)
    arr = arr + rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr + 64, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", **kw)
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    """40x20 stored (left half red, right half blue) with EXIF orientation 6 (display rotated 90 deg CW):
    shown upright it is 20x40 with red on top."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(Image.fromarray(arr), exif=exif.tobytes())


def bad_and_odd_images() -> dict[str, tuple[bytes, str | None]]:
    """file name -> (bytes, None if it must be kept, else a substring of the reason it is skipped)."""
    good = jpeg_bytes(photo(64, 48, 1))
    cmyk = io.BytesIO()
    photo(50, 50, 2).convert("CMYK").save(cmyk, "JPEG", quality=90)
    grey16 = Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16))
    palette = photo(30, 30, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = photo(30, 30, 4).convert("RGBA")
    rgba.putalpha(128)
    return {
        "good.jpg": (good, None),
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated"),
        "empty.jpg": (b"", "empty file"),
        "notes.jpg": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "cmyk.jpg": (cmyk.getvalue(), None),
        "grey16.png": (png_bytes(grey16), None),
        "palette_alpha.png": (png_bytes(palette, transparency=0), None),
        "rgba.png": (png_bytes(rgba), None),
        "grey.jpg": (jpeg_bytes(photo(40, 40, 5).convert("L")), None),
        "wide.png": (png_bytes(photo(2000, 10, 6)), None),
        "фото ü 写真.jpg": (jpeg_bytes(photo(33, 45, 7)), None),
        "rotated.jpg": (exif_rotated_jpeg(), None),
        "bad_png.png": (png_bytes(photo(20, 20, 8))[:-30], "corrupt or truncated"),
    }


def write_zoo(root: Path, per_class_good: int = 4) -> tuple[list[str], list[tuple[str, str]]]:
    """Class folders with good images plus every odd/bad file; returns (class names, [(path, reason part)])."""
    classes = ["cat", "dog", "øst-東"]
    bad: list[tuple[str, str]] = []
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class_good):
            photo(48 + 8 * i, 40, seed=100 * c + i).save(d / f"img_{i}.jpg", quality=90)
    for fname, (data, reason) in bad_and_odd_images().items():
        path = root / classes[0] / fname
        path.write_bytes(data)
        if reason:
            bad.append((str(path), reason))
    (root / classes[1] / ".DS_Store").write_bytes(b"hidden: ignored")
    return classes, bad


# -- shard sets whose images say which sample they are ---------------------------------------------------------


def id_color(i: int) -> tuple[int, int, int]:
    """Sample id -> a flat colour that survives JPEG (16 levels per channel, so up to 4096 ids)."""
    return (i % 16) * 16 + 8, (i // 16 % 16) * 16 + 8, (i // 256 % 16) * 16 + 8


def ids_from_images(images) -> list[int]:
    """Inverse of id_color for a batch of loader output in [-1, 1] (N, 3, H, W)."""
    px = ((images.mean(dim=(2, 3)) + 1) * 127.5).cpu().numpy()
    levels = np.clip(np.rint((px - 8) / 16), 0, 15).astype(int)
    return (levels[:, 0] + 16 * levels[:, 1] + 256 * levels[:, 2]).tolist()


def write_id_shards(out: Path, counts: list[int], num_classes: int = 5, resolution: int = 16,
                    index: bool = True, extra: dict[int, dict[str, bytes]] | None = None) -> Manifest:
    """A shard set written directly (no make_shards): sample i is a flat image of id_color(i), label i % K.

    `extra` replaces components of chosen samples (by global id), e.g. {3: {"jpg": b"junk"}} for corrupt data.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    gid = 0
    for s, n in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(n):
                comps = {"jpg": jpeg_bytes(Image.new("RGB", (resolution, resolution), id_color(gid))),
                         "cls": str(gid % num_classes).encode()}
                comps.update((extra or {}).get(gid, {}))
                for ext, data in comps.items():
                    info = tarfile.TarInfo(f"{gid:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                gid += 1
        idx = None
        if index:
            idx = name.replace(".tar", ".idx")
            with open(out / name, "rb") as f:
                (out / idx).write_text(format_index(index_from_tar(f)))
        shards.append(ShardInfo(name, n, sha256_file(str(out / name)), (out / name).stat().st_size, idx))
    manifest = Manifest(classes=[f"class{k}" for k in range(num_classes)], resolution=resolution, shards=shards)
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


# -- processes on loopback -------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """Embedded Ray on 127.0.0.1 (the loopback settings of pipeline.ray_local.init_ray), stopped on exit."""
    import ray

    from pipeline.ray_local import init_ray

    started = init_ray(num_cpus, object_store_mb=128)
    try:
        yield
    finally:
        if started:
            ray.shutdown()




@contextlib.contextmanager
def moto_s3(workdir: Path, bucket: str = "shards") -> Iterator[dict]:
    """`moto_server -H 127.0.0.1 -p PORT` with one bucket; yields {"options": fsspec storage options,
    "bucket": name, "endpoint": URL}."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = open(workdir / "moto.log", "wb")
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(workdir / 'moto.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("moto_server did not start") from None
                time.sleep(0.2)
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        with _env(creds):
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                       "client_kwargs": {"region_name": "us-east-1"}}
            yield {"options": options, "bucket": bucket, "endpoint": endpoint}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def corrupt_jpeg(seed: int = 0, size: int = 16) -> bytes:
    """A JPEG that passes every marker check (SOI first, EOI last, all headers present) but whose scan is
    garbage and names a Huffman table that is not defined: PIL and DALI both fail on it."""
    good = jpeg_bytes(photo(size, size, seed))
    sos = good.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")
    junk = np.random.default_rng(seed).integers(0, 256, len(good) - 2 - start, dtype=np.uint8).tobytes()
    data = bytearray(good[:start] + junk + b"\xff\xd9")
    data[sos + 6] = 0xFF  # the first component's DC/AC table ids: 15/15, never defined
    return bytes(data)
