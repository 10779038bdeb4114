"""Read samples of a shard set by id: the manifest for the shard list, the DALI index files for where each
sample's bytes lie, and byte-range reads of contiguous runs (local disk or any fsspec store such as s3).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from data_prep import shard_urls
from data_prep.shard_format import IndexEntry, Manifest, Store, index_from_tar, parse_index, read_manifest

log = logging.getLogger("pipeline.data")

MAX_RUN_BYTES = 64 << 20  # one range request reads at most this much


class Sample(NamedTuple):
    key: str  # "<shard name>/<sample key>"
    jpg: bytes | None  # the encoded image (JPEG, or PNG/WebP from shards indexed in place)
    label: int
    error: str | None  # why the sample cannot be used (None: fine so far)
    lost: bool = False  # its whole shard is unreadable (a shard fault, not a bad sample)


class ShardSet:
    """A manifest plus a flat table of every sample's component offsets, addressable by global id.

    Global ids run through the shards in manifest order. Shards without an index file are scanned once
    (slower: the whole tar is read) so shards written elsewhere still work.

    A shard that cannot be read (missing, truncated, its index unusable and the tar unscannable, a count
    that disagrees with the manifest, or a read that fails later) is marked bad in `self.bad` and logged
    once; its samples then come back `lost` without any further reads. It keeps its global ids, so the
    schedule of the other shards does not move (see faults.py for how ranks agree to quarantine it).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, io_threads: int = 4):
        self.url = url
        self.store = Store(url, storage_options)
        self.storage_options = dict(storage_options or {})
        self.manifest: Manifest = read_manifest(url, storage_options)
        self.io_threads = max(1, io_threads)
        self.bad: dict[int, str] = {}  # shard index -> why it cannot be read
        self.closed = False  # set by the loader: late reads of a closed loader report nothing
        self._lock = threading.Lock()
        self.index_of = {s.name: i for i, s in enumerate(self.manifest.shards)}
        with ThreadPoolExecutor(self.io_threads) as pool:
            tables = list(pool.map(self._load_index, range(len(self.manifest.shards))))
        self.counts = tuple(s.count for s in self.manifest.shards)  # a bad shard keeps its ids
        self.shard_of = np.repeat(np.arange(len(tables), dtype=np.int32), self.counts)
        cols = np.full((sum(self.counts), 4), -1, np.int64)  # image offset, image size, label offset, label size
        keys: list[str] = []
        row = 0
        image_keys, label_key = self.manifest.image_keys, self.manifest.label_key
        for shard, entries in zip(self.manifest.shards, tables):
            if entries is None:
                keys += ["?"] * shard.count
                row += shard.count
                continue
            for e in entries:
                img = next((e.components[k] for k in image_keys if k in e.components), None)
                lab = e.components.get(label_key)
                if img:
                    cols[row, 0:2] = img
                if lab:
                    cols[row, 2:4] = lab
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

    def mark_bad(self, i: int, reason: str) -> None:
        if self.closed:
            return
        with self._lock:
            first = i not in self.bad
            self.bad.setdefault(i, reason)
        if first:
            log.error("shard %s is unreadable (%s): its samples are skipped", self.manifest.shards[i].name, reason)

    def _load_index(self, i: int) -> list[IndexEntry] | None:
        shard = self.manifest.shards[i]
        entries = None
        if shard.index:
            try:
                entries = parse_index(self.store.read_bytes(shard.index).decode())
            except (OSError, ValueError, UnicodeDecodeError) as e:
                log.warning("%s: index %s unusable (%s): scanning the tar", shard.name, shard.index, e)
        try:
            if entries is None:
                with self._open(shard) as f:
                    entries = index_from_tar(f)
        except Exception as e:  # noqa: BLE001 - missing, truncated, not a tar: the shard is bad, not the run
            self.mark_bad(i, f"cannot scan the tar: {type(e).__name__}: {e}")
            return None
        if len(entries) != shard.count:
            self.mark_bad(i, f"manifest says {shard.count} samples, the tar has {len(entries)} (truncated?)")
            return None
        return entries

    def _open(self, shard):
        if shard.url:
            return shard_urls.open_stream(shard.url, self.storage_options)
        return self.store.fs.open(self.store.path(shard.name), "rb")

    def _read_range(self, shard, start: int, end: int) -> bytes:
        if shard.url:
            return shard_urls.read_range(shard.url, start, end, self.storage_options)
        return self.store.read_range(shard.name, start, end)

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

    def _lost(self, run: np.ndarray, i: int) -> dict[int, Sample]:
        shard = self.manifest.shards[i]
        why = f"shard unreadable: {self.bad.get(i, '?')}"
        return {gid: Sample(f"{shard.name}/{self.keys[gid]}", None, -1, why, True) for gid in run.tolist()}

    def _read_run(self, run: np.ndarray) -> dict[int, Sample]:
        i = int(self.shard_of[run[0]])
        shard = self.manifest.shards[i]
        if i in self.bad:
            return self._lost(run, i)
        valid = run[self._hi[run] >= 0]
        base = int(self._lo[valid].min()) if len(valid) else 0
        end = int(self._hi[valid].max()) if len(valid) else 0
        try:
            blob = self._read_range(shard, base, end) if len(valid) else b""
        except Exception as e:  # noqa: BLE001 - vanished, permission, network: a shard fault
            self.mark_bad(i, f"read failed: {type(e).__name__}: {e}")
            return self._lost(run, i)
        if len(blob) < end - base:
            self.mark_bad(i, f"truncated: bytes {base}..{end} wanted, {len(blob)} read")
            return self._lost(run, i)
        out: dict[int, Sample] = {}
        for gid in run.tolist():
            joff, jsize, coff, csize = self._cols[gid].tolist()
            key = f"{shard.name}/{self.keys[gid]}"
            if jsize < 0 or csize < 0:
                out[gid] = Sample(key, None, -1, f"missing image ({'/'.join(self.manifest.image_keys)}) or "
                                  f"label ({self.manifest.label_key}) component")
                continue
            raw = blob[coff - base : coff - base + csize]
            label = self._label(raw)
            if label is None:
                out[gid] = Sample(key, None, -1, f"bad .{self.manifest.label_key} {raw[:40]!r}")
                continue
            out[gid] = Sample(key, blob[joff - base : joff - base + jsize], label, None)
        return out

    def _label(self, raw: bytes) -> int | None:
        try:
            if self.manifest.label_key == "json":
                value = json.loads(raw)
                for part in self.manifest.label_field.split("."):
                    value = value[part]
                return int(value)
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            return None
