"""Image folders (or a built-in data set) to WebDataset shards with DALI index files and a manifest.

    python -m data_prep.make_shards SRC OUT --resolution 128 [--shard-size 1000 --quality 95 --workers 8 ...]

SRC is a class-per-folder tree (ImageNet train layout) or one of: fashion-mnist, mnist-5k, digits.
OUT is a local folder or an fsspec URL (s3://bucket/prefix).

Images are spread over shards in a seeded random order, so every shard mixes classes; each shard is one Ray
task (embedded local Ray on loopback by default, the cluster at RAY_ADDRESS when that is set). Every image is
decoded in full and checked; files that fail are listed in the manifest with the reason and never stop the
job. A re-run rebuilds only the shards whose sidecar is missing, describes other inputs, or whose sha256 no
longer matches.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_prep import images as imgs
from data_prep.shard_format import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    Store,
    index_name,
    sha256_file,
    shard_name,
    sidecar_name,
    write_index_file,
)
from data_prep.sources import Source, open_source, take_first
from pipeline.ray_local import init_ray

log = logging.getLogger("data_prep.make_shards")
_SHARD_FILE = re.compile(r"^shard-(\d{6})\.(tar|idx|json)$")
_TEMP_FILE = re.compile(r"^\.shard-\d{6}\.(tar|idx|json)\.tmp-[0-9a-f]{8}$")


@dataclass(frozen=True)
class ShardSettings:
    resolution: int  # side of the stored square, or the short side to keep with max_side
    quality: int = 95  # JPEG quality
    max_side: int | None = None  # keep aspect ratio with the long side up to this (random-crop training)
    source: str = ""


@dataclass
class ShardJob:
    index: int
    keys: list[str]  # sample keys in the tar, in write order
    labels: list[int]
    refs: list[Any]  # file paths relative to the source root, or rows of the source's pixel array

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def spec(self, settings: ShardSettings) -> str:
        """Fingerprint of everything the shard's bytes depend on: a re-run reuses a shard only if it matches."""
        payload = json.dumps([FORMAT, asdict(settings), self.keys, self.labels, [str(r) for r in self.refs]])
        return hashlib.sha256(payload.encode()).hexdigest()


def plan_shards(source: Source, shard_size: int, seed: int) -> list[ShardJob]:
    """Spread the items over shards in a seeded random order; sample keys are positions in that order."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    order = np.random.default_rng(seed).permutation(len(source))
    width = max(8, len(str(len(source))))
    jobs = []
    for i, start in enumerate(range(0, len(order), shard_size)):
        idx = order[start : start + shard_size]
        refs = [source.refs[j] for j in idx.tolist()]
        jobs.append(ShardJob(i, [f"{p:0{width}d}" for p in range(start, start + len(idx))],
                             source.labels[idx].tolist(), [r if isinstance(r, str) else int(r) for r in refs]))
    return jobs


# -- one shard (a Ray task) ----------------------------------------------------------------------------------
def build_shard(job: ShardJob, settings: ShardSettings, out_url: str, storage_options: dict | None,
                root: str | None, pixels: np.ndarray | None) -> dict:
    """Write (or verify and keep) one shard; returns its sidecar record. Bad images are skipped, not raised."""
    store = Store(out_url, storage_options)
    spec = job.spec(settings)
    reused = _verified_sidecar(store, job.name, spec)
    if reused is not None:
        return {**reused, "reused": True}

    skipped: list[dict[str, str]] = []
    classes: Counter[int] = Counter()
    tmp_tar, tmp_idx = store.temp_path(job.name), store.temp_path(index_name(job.name))
    count = 0
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, label, ref in zip(job.keys, job.labels, job.refs):
                where = f"{settings.source}#{ref}" if pixels is not None else os.path.join(root or "", ref)
                try:
                    jpg = _encode(ref, where, settings, pixels)
                except imgs.ImageRejected as e:
                    skipped.append({"path": where, "reason": str(e)})
                    continue
                except Exception as e:  # noqa: BLE001 - one odd input must never stop the job
                    skipped.append({"path": where, "reason": f"processing failed: {type(e).__name__}: {e}"})
                    continue
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.cls", str(label).encode("ascii"))
                classes[label] += 1
                count += 1
        record = {"name": job.name, "count": count, "spec": spec, "skipped": skipped,
                  "class_counts": {str(k): v for k, v in sorted(classes.items())}}
        if count == 0:  # nothing usable: no tar, only the sidecar (so a re-run does not retry the inputs)
            record.update(sha256="", bytes=0, index=None, index_tool="")
        else:
            record["index_tool"] = write_index_file(tmp_tar, tmp_idx)
            record.update(sha256=sha256_file(tmp_tar), bytes=os.path.getsize(tmp_tar), index=index_name(job.name))
            store.put_file(tmp_idx, index_name(job.name))
            store.put_file(tmp_tar, job.name)
        store.write_bytes(sidecar_name(job.name), json.dumps(record, indent=1).encode())  # the commit marker
        return {**record, "reused": False}
    finally:
        for leftover in (tmp_tar, tmp_idx):  # moved into place on success; dropped on failure
            if os.path.exists(leftover):
                os.remove(leftover)


def _encode(ref: Any, where: str, settings: ShardSettings, pixels: np.ndarray | None) -> bytes:
    if pixels is not None:
        return imgs.process_array(pixels[ref], settings.resolution, settings.quality, settings.max_side)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except OSError as e:
        raise imgs.ImageRejected(f"unreadable: {e.strerror or e}") from None
    return imgs.process_bytes(data, settings.resolution, settings.quality, settings.max_side)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata (mtime 0, no owner), so the same inputs give the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _verified_sidecar(store: Store, name: str, spec: str) -> dict | None:
    """The shard's sidecar when the shard on disk is complete and matches it; None means rebuild."""
    try:
        record = json.loads(store.read_bytes(sidecar_name(name)))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("spec") != spec:
        return None
    if record.get("count", 0) == 0:
        return record
    if not (store.exists(name) and record.get("index") and store.exists(record["index"])):
        return None
    if store.size(name) != record.get("bytes") or store.sha256(name) != record.get("sha256"):
        log.warning("%s does not match its sidecar checksum: rebuilding it", name)
        return None
    return record


# -- the job -------------------------------------------------------------------------------------------------
def make_shards(
    src: str,
    out: str,
    *,
    resolution: int,
    shard_size: int = 1000,
    quality: int = 95,
    seed: int = 0,
    max_side: int | None = None,
    workers: int | None = None,
    limit: int | None = None,
    limit_per_class: int | None = None,
    split: str = "train",
    storage_options: dict | None = None,
    progress: bool = True,
) -> Manifest:
    """Write the shard set for `src` under `out` and return its manifest (also written as manifest.json)."""
    if resolution < 1 or not (1 <= quality <= 100):
        raise ValueError("resolution must be >= 1 and quality in 1..100")
    if max_side is not None and max_side < resolution:
        raise ValueError(f"max_side ({max_side}) must be >= resolution ({resolution})")
    source = take_first(open_source(src, split), limit, limit_per_class)
    if len(source) == 0:
        raise ValueError(f"{src}: no inputs")
    jobs = plan_shards(source, shard_size, seed)
    settings = ShardSettings(resolution, quality, max_side, source.name)
    store = Store(out, storage_options)
    store.makedirs()

    if workers == 0:  # in this process, no Ray: for debugging and small tests
        records, errors, elapsed = _run_inline(jobs, settings, out, storage_options, source, progress)
    else:
        records, errors, elapsed = _run_ray(jobs, settings, out, storage_options, source, progress,
                                            workers or os.cpu_count() or 1)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} shards failed (re-run to retry them): "
                           + "; ".join(f"{shard_name(i)}: {e}" for i, e in sorted(errors.items())))

    _remove_stale(store, len(jobs))
    manifest = _manifest(source, settings, [records[j.index] for j in jobs], seed)
    store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
    reused = sum(r["reused"] for r in records.values())
    manifest.stats = {"shards_reused": reused, "shards_built": len(records) - reused, "elapsed_s": elapsed,
                      "images_per_s": len(source) / max(elapsed, 1e-9)}
    log.info("%d samples in %d shards (%d reused, %d skipped) in %.1fs: %s", manifest.num_samples,
             len(manifest.shards), reused, len(manifest.skipped), elapsed, store.url)
    return manifest


def _progress(total: int, progress: bool):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="img", desc="make_shards", file=sys.stderr, disable=not progress,
                dynamic_ncols=True, smoothing=0.1)


def _run_ray(jobs: list[ShardJob], settings: ShardSettings, out: str, storage_options: dict | None,
             source: Source, progress: bool, workers: int) -> tuple[dict[int, dict], dict[int, str], float]:
    import ray  # noqa: PLC0415

    pixel_bytes = 0 if source.pixels is None else source.pixels.nbytes
    started = init_ray(workers, object_store_mb=max(256, 3 * pixel_bytes >> 20))
    records: dict[int, dict] = {}
    errors: dict[int, str] = {}
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(build_shard)
        pixels = None if source.pixels is None else ray.put(source.pixels)
        pending: dict[Any, ShardJob] = {}
        queue = list(reversed(jobs))
        t0 = time.perf_counter()
        bar = _progress(len(source), progress)
        skipped = 0
        while queue or pending:
            while queue and len(pending) < workers:  # `workers` shards in flight, on a local Ray or a cluster
                job = queue.pop()
                pending[task.remote(job, settings, out, storage_options, source.root, pixels)] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                records[job.index] = rec = ray.get(done[0])
                skipped += len(rec["skipped"])
            except Exception as e:  # noqa: BLE001 - one shard failing must not lose the others' work
                errors[job.index] = f"{type(e).__name__}: {e}"
                log.error("%s failed: %s", job.name, errors[job.index])
            bar.update(len(job.keys))
            bar.set_postfix(skipped=skipped, refresh=False)
        bar.close()
        return records, errors, time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def _run_inline(jobs: list[ShardJob], settings: ShardSettings, out: str, storage_options: dict | None,
                source: Source, progress: bool) -> tuple[dict[int, dict], dict[int, str], float]:
    records: dict[int, dict] = {}
    errors: dict[int, str] = {}
    t0 = time.perf_counter()
    bar = _progress(len(source), progress)
    for job in jobs:
        try:
            records[job.index] = build_shard(job, settings, out, storage_options, source.root, source.pixels)
        except Exception as e:  # noqa: BLE001 - as with Ray: report, keep going
            errors[job.index] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s", job.name, errors[job.index])
        bar.update(len(job.keys))
    bar.close()
    return records, errors, time.perf_counter() - t0


def _manifest(source: Source, settings: ShardSettings, records: list[dict], seed: int) -> Manifest:
    counts = np.zeros(len(source.classes), np.int64)
    for r in records:
        for k, v in r["class_counts"].items():
            counts[int(k)] += v
    tools = sorted({r["index_tool"] for r in records if r["count"]})
    return Manifest(
        classes=list(source.classes),
        resolution=settings.resolution,
        shards=[ShardInfo(r["name"], r["count"], r["sha256"], r["bytes"], r["index"]) for r in records if r["count"]],
        skipped=[s for r in records for s in r["skipped"]],
        max_side=settings.max_side,
        quality=settings.quality,
        seed=seed,
        source=source.name,
        class_counts=counts.tolist(),
        index_tool=",".join(tools),
    )


def _remove_stale(store: Store, num_shards: int) -> None:
    """Shard files left by an earlier run with more shards (a different --shard-size or --limit), and
    temporary files of an interrupted run."""
    for name in store.listdir():
        m = _SHARD_FILE.match(name)
        if (m and int(m.group(1)) >= num_shards) or _TEMP_FILE.match(name):
            store.remove(name)


# -- CLI -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.make_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="class-per-folder tree, or fashion-mnist | mnist-5k | digits")
    p.add_argument("out", help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--resolution", type=int, required=True, help="output side (center crop + resize)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0, help="seed of the order images are spread over shards in")
    p.add_argument("--max-side", type=int, default=None,
                   help="keep aspect ratio, long side up to this, short side >= resolution (random-crop training)")
    p.add_argument("--workers", type=int, default=None,
                   help="shards built at once as Ray tasks (default: CPU count); 0 = in this process, no Ray")
    p.add_argument("--limit", type=int, default=None, help="take only the first N images in total")
    p.add_argument("--limit-per-class", type=int, default=None, help="take only the first N images of each class")
    p.add_argument("--split", default="train", choices=["train", "test"], help="split of fashion-mnist")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for OUT, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option wants KEY=VALUE, got {pair!r}")
        opts[key] = {"true": True, "false": False}.get(value.lower(), value)
    return opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        manifest = make_shards(
            args.src, args.out, resolution=args.resolution, shard_size=args.shard_size, quality=args.quality,
            seed=args.seed, max_side=args.max_side, workers=args.workers, limit=args.limit,
            limit_per_class=args.limit_per_class, split=args.split,
            storage_options=_storage_options(args.storage_option), progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    for s in manifest.skipped[:50]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(manifest.skipped) > 50:
        print(f"... and {len(manifest.skipped) - 50} more (see {MANIFEST_NAME})", file=sys.stderr)
    print(json.dumps({"out": args.out, "num_samples": manifest.num_samples, "shards": len(manifest.shards),
                      "classes": manifest.num_classes, "skipped": len(manifest.skipped)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
