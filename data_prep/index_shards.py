"""Existing WebDataset shards to a shard set training can read, in place, without re-encoding.

    python -m data_prep.index_shards 'URL/{000000..000999}.tar' OUT [--image-keys 'jpg;jpeg;png;webp']
        [--label-key cls | --label-key json --label-field label] [--classes names.txt] [--workers 8]

URL is anything WebDataset opens: a local path, s3://, gs://, http(s)://, or `pipe:COMMAND` (brace patterns
and `::`-joined lists expand as in WebDataset). Every shard is streamed once: every image is decoded in
full, its label parsed and checked, and the byte offsets of every member recorded. OUT (a folder or fsspec
URL) receives manifest.json (each shard's URL, where the tars stay), one DALI index file per shard
(listing only the samples that passed), and bad_samples.jsonl (key, shard, reason per rejected sample or
unreadable shard). Training then reads the tars in place by byte range (`data.shards=OUT`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

from data_prep import images as imgs
from data_prep import shard_urls
from data_prep.shard_format import (
    MANIFEST_NAME,
    IndexEntry,
    Manifest,
    ShardInfo,
    Store,
    format_index,
    split_member_name,
)

log = logging.getLogger("data_prep.index_shards")
BAD_SAMPLES_NAME = "bad_samples.jsonl"
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TRAINABLE = ("JPEG", "PNG", "WEBP")  # what both training decoders (PIL, DALI) take


@dataclass(frozen=True)
class LabelSpec:
    key: str = "cls"  # "cls" or "json"
    field: str = ""  # json: dotted path of the class index, e.g. "label" or "meta.class_id"
    num_classes: int | None = None  # when known, labels must be below it

    def parse(self, raw: bytes) -> int:
        if self.key == "json":
            value: Any = json.loads(raw)
            for part in self.field.split("."):
                value = value[part]
        else:
            value = raw.decode("ascii").strip()
        label = int(value)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} outside 0..{(self.num_classes or 0) - 1}")
        return label


@dataclass
class ShardScan:
    index: int
    url: str
    entries: list[IndexEntry] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    short_sides: list[int] = field(default_factory=list)
    sha256: str = ""
    bytes: int = 0
    seen: int = 0
    error: str | None = None  # the shard could not be read to its end


class _Hashing:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def scan_shard(index: int, url: str, image_keys: tuple[str, ...], labels: LabelSpec,
               storage_options: dict | None = None) -> ShardScan:
    """Stream one tar: offsets of every member, and every sample checked (full decode, label)."""
    scan = ShardScan(index, url)
    name = url.rsplit("/", 1)[-1]
    current: dict[str, Any] = {}

    def finish() -> None:
        if not current:
            return
        scan.seen += 1
        key, comps, data = current["key"], current["comps"], current["data"]
        reason = _check_sample(comps, data, image_keys, labels, scan)
        if reason:
            scan.bad.append({"key": key, "shard": url, "reason": reason})
        else:
            scan.entries.append(IndexEntry(key, comps))
        current.clear()

    try:
        with shard_urls.open_stream(url, storage_options) as raw:
            stream = _Hashing(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = split_member_name(member.name)
                    if not key or key.endswith("/"):
                        continue
                    if current and current["key"] != key:
                        finish()
                    if not current:
                        current.update(key=key, comps={}, data={})
                    current["comps"][ext] = (member.offset_data, member.size)
                    if ext in image_keys or ext == labels.key:
                        current["data"][ext] = tar.extractfile(member).read()
            finish()
            stream.drain()
            scan.sha256, scan.bytes = stream.sha.hexdigest(), stream.n
    except Exception as e:  # noqa: BLE001 - missing, truncated, not a tar: listed, the others go on
        current.clear()  # a sample cut off by the fault is not kept
        scan.error = f"{type(e).__name__}: {e}"
        scan.bad.append({"key": "*", "shard": url,
                         "reason": f"unreadable after {scan.seen} samples ({name}): {scan.error}"})
    return scan


def _check_sample(comps: dict, data: dict, image_keys: tuple[str, ...], labels: LabelSpec,
                  scan: ShardScan) -> str | None:
    ext = next((k for k in image_keys if k in comps), None)
    if ext is None:
        return f"no image component ({', '.join(image_keys)}) among {sorted(comps)}"
    if labels.key not in comps:
        return f"no .{labels.key} label"
    try:
        label = labels.parse(data[labels.key])
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad label
        return f"bad .{labels.key} label {data[labels.key][:60]!r}: {type(e).__name__}: {e}"
    blob = data[ext]
    try:
        img = imgs.decode(blob)  # every pixel: a corrupt or truncated image is caught here, not in training
        fmt = _format(blob)
    except imgs.ImageRejected as e:
        return f".{ext}: {e}"
    if fmt not in TRAINABLE:
        return f".{ext}: {fmt or 'unknown'} images are not read by the training decoders ({', '.join(TRAINABLE)})"
    scan.labels.append(label)
    scan.short_sides.append(min(img.size))
    return None


def _format(blob: bytes) -> str | None:
    if blob.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "WEBP"
    with Image.open(io.BytesIO(blob)) as im:
        return im.format


def index_shards(pattern: str, out: str, *, image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS,
                 labels: LabelSpec = LabelSpec(), classes: list[str] | None = None, resolution: int | None = None,
                 workers: int = 0, storage_options: dict | None = None, progress: bool = True) -> Manifest:
    """Scan the shards `pattern` names and write manifest.json, index files and bad_samples.jsonl in `out`."""
    urls = [_absolute(u) for u in shard_urls.expand(pattern)]
    if classes is not None and labels.num_classes is None:
        labels = LabelSpec(labels.key, labels.field, len(classes))
    if labels.key not in ("cls", "json") or (labels.key == "json" and not labels.field):
        raise ValueError("label key must be 'cls', or 'json' with a field name (--label-field)")
    store = Store(out, storage_options)
    store.makedirs()
    scans: dict[int, ShardScan] = {}
    t0 = time.perf_counter()
    bar = _progress(len(urls), progress)
    if workers <= 0:
        for i, url in enumerate(urls):
            scans[i] = scan_shard(i, url, image_keys, labels, storage_options)
            _tick(bar, scans[i])
    else:
        # spawn, not fork: a caller with threads (a DALI pipeline, a loader) can leave a forked child locked
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(scan_shard, i, u, image_keys, labels, storage_options) for i, u in enumerate(urls)]
            for f in as_completed(futures):
                s = f.result()
                scans[s.index] = s
                _tick(bar, s)
    bar.close()

    parent = shard_urls.common_parent(urls)
    shards: list[ShardInfo] = []
    counts: Counter[int] = Counter()
    sides: list[int] = []
    bad: list[dict[str, str]] = []
    for i in range(len(urls)):
        s = scans[i]
        bad += s.bad
        if not s.entries:
            continue
        idx = f"index-{i:06d}.idx"
        store.write_bytes(idx, format_index(s.entries).encode())
        shards.append(ShardInfo(urls[i][len(parent):] or urls[i], len(s.entries), s.sha256, s.bytes, idx, url=urls[i]))
        counts.update(s.labels)
        sides += s.short_sides
    if not shards:
        raise ValueError(f"{pattern}: no usable sample in {len(urls)} shard(s); see {BAD_SAMPLES_NAME}")
    n_classes = len(classes) if classes is not None else max(counts) + 1
    manifest = Manifest(
        classes=list(classes) if classes is not None else [str(k) for k in range(n_classes)],
        resolution=resolution or int(np.median(sides)),
        shards=shards,
        skipped=[{"path": f"{b['shard']}#{b['key']}", "reason": b["reason"]} for b in bad],
        source=pattern,
        class_counts=[counts.get(k, 0) for k in range(n_classes)],
        index_tool="index_shards",
        image_keys=list(image_keys),
        label_key=labels.key,
        label_field=labels.field,
    )
    store.write_bytes(BAD_SAMPLES_NAME, "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad).encode())
    store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
    elapsed = time.perf_counter() - t0
    seen = sum(s.seen for s in scans.values())
    manifest.stats = {"elapsed_s": elapsed, "samples_seen": seen, "images_per_s": seen / max(elapsed, 1e-9),
                      "shards_unreadable": sum(s.error is not None for s in scans.values())}
    log.info("%d good samples in %d of %d shards, %d bad, in %.1fs: %s", manifest.num_samples, len(shards),
             len(urls), len(bad), elapsed, store.url)
    return manifest


def _absolute(url: str) -> str:
    """Local paths become absolute, so the manifest finds the tars from any working directory."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.abspath(url)


def _progress(total: int, progress: bool):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="shard", desc="index_shards", file=sys.stderr, disable=not progress,
                dynamic_ncols=True)


def _tick(bar, scan: ShardScan) -> None:
    bar.update(1)
    bar.set_postfix(samples=scan.seen, bad=len(scan.bad), refresh=False)


# -- CLI -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.index_shards", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=_Formatter)
    p.add_argument("shards", help="shard URL pattern, e.g. 's3://bucket/train-{000000..000999}.tar' (quote it)")
    p.add_argument("out", help="folder or fsspec URL for manifest.json, index files and bad_samples.jsonl")
    p.add_argument("--image-keys", default=";".join(DEFAULT_IMAGE_KEYS),
                   help="image extensions, ';'-separated; a sample's image is the first one present")
    p.add_argument("--label-key", default="cls", choices=["cls", "json"], help="where the class index is")
    p.add_argument("--label-field", default="", help="with --label-key json: the field (dotted path) of the class index")
    p.add_argument("--classes", default=None, help="text file of class names, one per line (index = line number)")
    p.add_argument("--num-classes", type=int, default=None, help="labels must be below this (unset: the largest label + 1)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution in the manifest (unset: the median short side)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards scanned at once (processes); 0 = inline")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the shards and OUT, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    from data_prep.make_shards import _storage_options  # noqa: PLC0415 - the same KEY=VALUE parsing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    classes = None
    if args.classes:
        with open(args.classes, encoding="utf-8") as f:
            classes = [line.rstrip("\n") for line in f if line.strip()]
    keys = tuple(k.strip().lstrip(".") for k in args.image_keys.split(";") if k.strip())
    try:
        manifest = index_shards(
            args.shards, args.out, image_keys=keys, labels=LabelSpec(args.label_key, args.label_field, args.num_classes),
            classes=classes, resolution=args.resolution, workers=args.workers,
            storage_options=_storage_options(args.storage_option), progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"index_shards: error: {e}", file=sys.stderr)
        return 1
    for s in manifest.skipped[:20]:
        print(f"bad {s['path']}: {s['reason']}", file=sys.stderr)
    if len(manifest.skipped) > 20:
        print(f"... and {len(manifest.skipped) - 20} more (see {BAD_SAMPLES_NAME})", file=sys.stderr)
    print(json.dumps({"out": args.out, "num_samples": manifest.num_samples, "shards": len(manifest.shards),
                      "classes": manifest.num_classes, "bad": len(manifest.skipped),
                      "images_per_s": round(manifest.stats["images_per_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
