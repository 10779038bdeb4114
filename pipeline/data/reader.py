"""Read samples of a shard set by id: the manifest for the shard list, the DALI index files for where each
sample's bytes lie, and byte-range reads of contiguous runs (local disk or any fsspec store such as s3).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from data_prep.shard_format import IndexEntry, Manifest, Store, index_from_tar, parse_index, read_manifest

log = logging.getLogger("pipeline.data")

MAX_RUN_BYTES = 64 << 20  # one range request reads at most this much


class Sample(NamedTuple):
    key: str  # "<shard name>/<sample key>"
    jpg: bytes | None
    label: int
    error: str | None  # why the sample cannot be used (None: fine so far)


class ShardSet:
    """A manifest plus a flat table of every sample's component offsets, addressable by global id.

    Global ids run through the shards in manifest order. Shards without an index file are scanned once
    (slower: the whole tar is read) so shards written elsewhere still work.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, io_threads: int = 4):
        self.url = url
        self.store = Store(url, storage_options)
        self.manifest: Manifest = read_manifest(url, storage_options)
        self.io_threads = max(1, io_threads)
        with ThreadPoolExecutor(self.io_threads) as pool:
            tables = list(pool.map(self._load_index, self.manifest.shards))
        self.counts = tuple(len(t) for t in tables)
        self.shard_of = np.repeat(np.arange(len(tables), dtype=np.int32), self.counts)
        cols = np.full((sum(self.counts), 4), -1, np.int64)  # jpg offset, jpg size, cls offset, cls size
        keys: list[str] = []
        row = 0
        for entries in tables:
            for e in entries:
                jpg, cls = e.components.get("jpg"), e.components.get("cls")
                if jpg:
                    cols[row, 0:2] = jpg
                if cls:
                    cols[row, 2:4] = cls
                keys.append(e.key)
                row += 1
        self._cols = cols
        self.keys = np.asarray(keys, dtype=object)
        present = cols[:, [0, 2]] >= 0
        ends = np.where(present, cols[:, [0, 2]] + cols[:, [1, 3]], -1)
        starts = np.where(present, cols[:, [0, 2]], np.iinfo(np.int64).max)
        self._lo = starts.min(axis=1)  # first byte of any component of the sample
        self._hi = ends.max(axis=1)  # one past its last byte

    def __len__(self) -> int:
        return len(self.shard_of)

    def _load_index(self, shard) -> list[IndexEntry]:
        entries = None
        if shard.index:
            try:
                entries = parse_index(self.store.read_bytes(shard.index).decode())
            except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
                log.warning("%s: index %s unusable (%s): scanning the tar", shard.name, shard.index, e)
        if entries is None:
            with self.store.fs.open(self.store.path(shard.name), "rb") as f:
                entries = index_from_tar(f)
        if len(entries) != shard.count:
            raise ValueError(f"{shard.name}: manifest says {shard.count} samples, the index has {len(entries)}")
        return entries

    def key(self, gid: int) -> str:
        return f"{self.manifest.shards[self.shard_of[gid]].name}/{self.keys[gid]}"

    def read(self, ids: np.ndarray) -> dict[int, Sample]:
        """Samples for the given global ids (duplicates allowed), reading each contiguous run once."""
        uniq = np.unique(np.asarray(ids, np.int64))
        runs = list(self._runs(uniq))
        out: dict[int, Sample] = {}
        if len(runs) <= 1 or self.io_threads == 1:
            parts = [self._read_run(r) for r in runs]
        else:
            with ThreadPoolExecutor(min(self.io_threads, len(runs))) as pool:
                parts = list(pool.map(self._read_run, runs))
        for part in parts:
            out.update(part)
        return out

    def _runs(self, uniq: np.ndarray):
        """Split sorted unique ids into runs of neighbouring samples of one shard, at most MAX_RUN_BYTES."""
        if len(uniq) == 0:
            return
        start = 0
        for i in range(1, len(uniq) + 1):
            if (
                i == len(uniq)
                or uniq[i] != uniq[i - 1] + 1
                or self.shard_of[uniq[i]] != self.shard_of[uniq[start]]
                or self._hi[uniq[i]] - self._lo[uniq[start]] > MAX_RUN_BYTES
            ):
                yield uniq[start:i]
                start = i

    def _read_run(self, run: np.ndarray) -> dict[int, Sample]:
        shard = self.manifest.shards[self.shard_of[run[0]]]
        valid = run[self._hi[run] >= 0]
        base = int(self._lo[valid].min()) if len(valid) else 0
        blob = self.store.read_range(shard.name, base, int(self._hi[valid].max())) if len(valid) else b""
        out: dict[int, Sample] = {}
        for gid in run.tolist():
            joff, jsize, coff, csize = self._cols[gid].tolist()
            key = f"{shard.name}/{self.keys[gid]}"
            if jsize < 0 or csize < 0:
                out[gid] = Sample(key, None, -1, "missing .jpg or .cls component")
                continue
            cls = blob[coff - base : coff - base + csize]
            try:
                label = int(cls.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                out[gid] = Sample(key, None, -1, f"bad .cls {cls[:20]!r}")
                continue
            jpg = blob[joff - base : joff - base + jsize]
            out[gid] = Sample(key, jpg, label, None if len(jpg) == jsize else "short read")
        return out
