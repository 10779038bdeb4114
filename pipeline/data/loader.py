"""`build_loader`: one loader contract over three backends (DALI on GPU, DALI on CPU, WebDataset + PIL).

The loader is an infinite stream of (images, labels) batches across epochs. Which samples form batch k of
epoch e on rank r is decided by `EpochPlan` alone (see schedule.py), before any backend sees them, so:
- ranks read disjoint samples and the same number of batches every epoch (drop_last; with drop_last=False
  the last batches wrap around to the epoch's start and may repeat a few samples);
- `state()` is the position of the next batch, and a loader built with that position continues with
  exactly the batch the old one would have produced next, whatever the backend;
- backends differ only in how they decode: the augmentation draws come from the schedule too.

A background thread reads windows of the rank's order (byte-range reads of contiguous runs), checks each
sample, and for "wds" decodes with PIL; DALI pulls the same raw batches through an external source.
A sample that cannot be used (bad label, not an image, truncated, the decoder fails on it: PIL, or DALI,
whose failed batch is then decoded by PIL, see backends.DaliDecoder) is skipped: logged with its key and
cause, counted in `.skipped`, and its slot in the batch is filled with another sample of the same batch, so
batch shapes and positions never move. A shard that cannot be read is handled as faults.py describes:
its samples are replaced the same way until `sync_faults` (called by every rank at the same step)
quarantines it from the next epoch on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.data import faults
from pipeline.data.backends import DaliDecoder, PilDecoder, dali_available, to_unit_range
from pipeline.data.reader import Sample, ShardSet
from pipeline.data.schedule import AugParams, EpochPlan

log = logging.getLogger("pipeline.data")
BACKENDS = ("auto", "dali-gpu", "dali-cpu", "wds")


def read_manifest(shards: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shard set's manifest.json as a dict (classes: list of names by index, resolution, shards, ...)."""
    from data_prep.shard_format import read_manifest as _read  # noqa: PLC0415

    data = asdict(_read(shards, storage_options))
    data.pop("stats", None)
    return data


def pick_backend(backend: str, device: torch.device) -> str:
    """auto: dali-gpu for a CUDA device, else dali-cpu where DALI imports, else wds."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend != "auto":
        if backend.startswith("dali") and not dali_available():
            raise ImportError(f"backend {backend} needs nvidia-dali, which does not import here")
        return backend
    if not dali_available():
        return "wds"
    return "dali-gpu" if device.type == "cuda" and torch.cuda.is_available() else "dali-cpu"


@dataclass
class _RawBatch:
    epoch: int
    offset: int
    ids: list[int]  # global sample ids in the batch's slots (after replacement)
    jpgs: list[bytes]
    labels: np.ndarray  # int64
    aug: AugParams
    images: torch.Tensor | None = None  # uint8 NHWC, decoded already ("wds")
    bad: list[tuple[str, str, bool]] = field(default_factory=list)  # (key, cause, lost with its shard)

    @property
    def serial(self) -> int:
        return (self.epoch << 32) | self.offset


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.skipped = 0
        self.lost = 0  # of those, samples of unreadable shards
        self.keys: dict[str, str] = {}  # bad samples (not those of bad shards) -> cause

    def record(self, key: str, cause: str, lost: bool) -> None:
        with self.lock:
            self.skipped += 1
            if lost:
                self.lost += 1
                return
            first = key not in self.keys
            self.keys.setdefault(key, cause)
        if first:
            log.warning("skipping sample %s: %s", key, cause)


def replace_bad(errors: list[str | None], samples: list[Sample], jpgs: list[bytes], labels: np.ndarray,
                ids: list[int], images: torch.Tensor | None) -> list[tuple[str, str, bool]]:
    """Fill every failed slot with the nearest usable sample before it (else the first usable one)."""
    good = [i for i, e in enumerate(errors) if e is None]
    bad: list[tuple[str, str, bool]] = []
    if not good:
        return [(s.key, e, s.lost) for s, e in zip(samples, errors)]
    for i, e in enumerate(errors):
        if e is None:
            continue
        bad.append((samples[i].key, e, samples[i].lost))
        j = max((g for g in good if g < i), default=good[0])
        jpgs[i], labels[i], ids[i] = jpgs[j], labels[j], ids[j]
        if images is not None:
            images[i] = images[j]
    return bad


class _Producer(threading.Thread):
    """Reads, checks (and for "wds" decodes) batches in schedule order into a bounded queue."""

    def __init__(self, shards: ShardSet, plan_for, rank: int, epoch: int, offset: int,
                 decoder: PilDecoder | None, box: _Stream, known_bad: dict[int, str]):
        super().__init__(name=f"shard-producer-r{rank}", daemon=True)
        self.shards, self.plan_for, self.rank = shards, plan_for, rank
        self.epoch, self.offset = epoch, offset
        self.decoder, self.out, self.box = decoder, box.queue, box
        self.known_bad = known_bad  # sample id -> cause, found by a decoder after the checks here
        self.num_classes = len(shards.manifest.classes)
        self.io = ThreadPoolExecutor(1, thread_name_prefix="shard-window")
        self.orders: dict[int, np.ndarray] = {}
        self.windows: dict[tuple[int, int], Future] = {}

    def run(self) -> None:
        try:
            epoch, offset = self.epoch, self.offset
            while not self.box.halted():
                for b in range(offset, self.plan_for(epoch).batches_per_epoch):
                    if not self._put(self._batch(epoch, b)):
                        return
                epoch, offset = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            if self.box.halted():
                return  # closed while reading: nothing to report
            log.exception("data loading failed")
            self._put(RuntimeError(f"data loading failed: {type(e).__name__}: {e}"))
        finally:
            self.io.shutdown(wait=False, cancel_futures=True)

    def _put(self, item: object) -> bool:
        while not self.box.halted():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- reading -------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = self.plan_for(epoch).rank_order(epoch, self.rank)
        return self.orders[epoch]

    def _window(self, epoch: int, w: int) -> dict[int, Sample]:
        """Samples of window w of `epoch`; also starts reading the next window in the background."""
        plan = self.plan_for(epoch)
        n_windows = -(-plan.samples_per_rank // max(1, plan.shuffle_window))
        nxt = (epoch, w + 1) if w + 1 < n_windows else (epoch + 1, 0)
        for key in ((epoch, w), nxt):
            if key not in self.windows:
                size = max(1, plan.shuffle_window)
                ids = self._order(key[0])[key[1] * size : (key[1] + 1) * size]
                self.windows[key] = self.io.submit(self.shards.read, ids)
        for key in [k for k in self.windows if k < (epoch, w)]:
            del self.windows[key]
        return self.windows[(epoch, w)].result()

    def _batch(self, epoch: int, b: int) -> _RawBatch:
        plan = self.plan_for(epoch)
        order = self._order(epoch)
        pos = np.arange(b * plan.batch_size, (b + 1) * plan.batch_size)
        ids = order[pos].tolist()
        samples = [self._window(epoch, plan.window_of(p))[gid] for p, gid in zip(pos.tolist(), ids)]
        jpgs = [s.jpg or b"" for s in samples]
        labels = np.asarray([s.label for s in samples], np.int64)
        strict = self.decoder is None  # DALI cannot skip a bad JPEG; PIL finds truncation when decoding
        errors = [s.error or self.known_bad.get(g) or _check(s, self.num_classes, strict)
                  for s, g in zip(samples, ids)]
        aug = plan.aug_params(epoch, self.rank, b)
        images = None
        if self.decoder is not None:
            images, decode_errors = self.decoder.decode([j if e is None else b"" for j, e in zip(jpgs, errors)], aug)
            errors = [e or d for e, d in zip(errors, decode_errors)]
        bad = replace_bad(errors, samples, jpgs, labels, ids, images)
        if len(bad) == len(samples):  # nothing usable in the batch (e.g. all of it from a vanished shard)
            jpgs, labels, ids, images = self._donors(epoch, b, aug)
        return _RawBatch(epoch, b, ids, jpgs, labels, aug, images, bad)

    def _donors(self, epoch: int, b: int, aug: AugParams):
        """Stand-ins for a batch with no usable sample: the first usable samples after it in the rank's
        order (wrapping around), so the choice depends on the position alone, as a resumed run needs."""
        plan, order = self.plan_for(epoch), self._order(epoch)
        n, chunk = plan.batch_size, max(plan.batch_size, plan.shuffle_window)
        found: list[tuple[int, Sample]] = []
        for start in range((b + 1) * n, (b + 1) * n + len(order), chunk):
            pos = np.arange(start, min(start + chunk, (b + 1) * n + len(order))) % len(order)
            got = self.shards.read(order[pos])
            for gid in order[pos].tolist():
                s = got[gid]
                if not (s.error or self.known_bad.get(gid) or _check(s, self.num_classes, self.decoder is None)):
                    found.append((gid, s))
            if len(found) >= n:
                break
        if not found:
            raise RuntimeError(f"no usable sample left in epoch {epoch} (bad shards: "
                               f"{', '.join(sorted(self.shards.manifest.shards[i].name for i in self.shards.bad))})")
        picks = [found[i % len(found)] for i in range(n)]
        ids, jpgs = [g for g, _ in picks], [s.jpg for _, s in picks]
        labels = np.asarray([s.label for _, s in picks], np.int64)
        images = None
        if self.decoder is not None:
            images, errors = self.decoder.decode(jpgs, aug)
            if replace_bad(errors, [s for _, s in picks], jpgs, labels, ids, images) and all(errors):
                raise RuntimeError(f"no decodable sample found to stand in for batch {b} of epoch {epoch}")
        return jpgs, labels, ids, images


def _check(s: Sample, num_classes: int, strict: bool) -> str | None:
    """Cheap checks before a decoder sees the bytes. `strict` (DALI) also wants a JPEG's end-of-image marker
    last, which rejects a truncated file but also a valid one with trailing data."""
    if not 0 <= s.label < num_classes:
        return f"label {s.label} outside 0..{num_classes - 1}"
    if not s.jpg:
        return "empty image"
    if s.jpg.startswith(b"\xff\xd8\xff"):
        if strict and not s.jpg.rstrip(b"\0").endswith(b"\xff\xd9"):
            return "truncated JPEG (no EOI marker)"
        return None
    if s.jpg.startswith(b"\x89PNG\r\n\x1a\n") or (s.jpg[:4] == b"RIFF" and s.jpg[8:12] == b"WEBP"):
        return None
    return "not a JPEG, PNG or WebP image"


class _Schedule:
    """epoch -> EpochPlan less the shards quarantined by then (shared with the producer thread, which must
    not hold the loader itself, so that a dropped loader is collected)."""

    def __init__(self, plan: EpochPlan, index_of: dict[str, int], quarantine: dict[str, int]):
        self.plan, self.index_of, self.quarantine = plan, index_of, quarantine
        self.plans: dict[frozenset[int], EpochPlan] = {frozenset(): plan}

    def __call__(self, epoch: int) -> EpochPlan:
        excluded = frozenset(self.index_of[n] for n, e in self.quarantine.items() if e <= epoch and n in self.index_of)
        if excluded not in self.plans:
            self.plans[excluded] = replace(self.plan, excluded=excluded)
        return self.plans[excluded]


class _Stream:
    """What one run of the background reader owns; stopped as a whole (close, restart, garbage collection)."""

    def __init__(self, prefetch: int):
        self.stop = threading.Event()
        self.abandoned = False  # set by the loader's finalizer: a plain flag, see _abandon
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.producer: _Producer | None = None

    def halted(self) -> bool:
        return self.abandoned or self.stop.is_set()

    def next_raw(self) -> _RawBatch:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def shutdown(self, join: bool = False) -> None:
        self.stop.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        if join and self.producer is not None:
            self.producer.join(timeout=5)


class ShardLoader:
    """An infinite stream of (images, labels) from a shard set; see the module docstring."""

    def __init__(self, shards: ShardSet, plan: EpochPlan, *, rank: int, device: torch.device, backend: str,
                 resolution: int, num_threads: int, start_epoch: int, start_offset: int, prefetch: int = 2,
                 quarantine: dict[str, int] | None = None):
        if start_epoch < 0 or start_offset < 0:
            raise ValueError("start_epoch and start_offset must be >= 0")
        self.shards, self.plan, self.rank, self.device = shards, plan, rank, device
        self.resolution, self.num_threads, self.prefetch = resolution, num_threads, prefetch
        self.class_names = list(shards.manifest.classes)
        self.num_classes = len(self.class_names)
        self.batch_size = plan.batch_size
        self._quarantine: dict[str, int] = {}  # shard name -> first epoch it is left out of
        self._schedule = _Schedule(plan, shards.index_of, self._quarantine)
        self._epoch, self._offset = start_epoch, start_offset
        self._stats = _Stats()
        self._known_bad: dict[int, str] = {}  # sample ids a decoder failed on (DALI), skipped from then on
        self._stream: _Stream | None = None
        self._closed = False
        self._pil: PilDecoder | None = None
        self._dali: DaliDecoder | None = None
        self._dali_fallbacks = 0
        self._fault_s = 0.0  # time spent on batches DALI failed on (rebuild + CPU decode)
        self._boxes: list[_Stream] = []  # streams to stop when the loader is collected
        chosen = pick_backend(backend, device)
        if chosen.startswith("dali"):
            try:
                self._dali = DaliDecoder(resolution, plan.batch_size, num_threads, device, gpu=chosen == "dali-gpu")
            except Exception as e:
                if backend != "auto":
                    raise
                log.warning("DALI pipeline unavailable (%s: %s): using the wds backend", type(e).__name__, e)
                chosen = "wds"
        if chosen == "wds":
            self._pil = PilDecoder(resolution, num_threads, pin_memory=device.type == "cuda")
        self.backend = chosen
        self._finalizer = weakref.finalize(self, _abandon, self._boxes)
        if quarantine:
            self.restore_faults(quarantine)
        self._normalize_position()

    # -- schedule ------------------------------------------------------------------------------------------
    def plan_for(self, epoch: int) -> EpochPlan:
        """The schedule of `epoch`: the base plan less the shards quarantined by then."""
        return self._schedule(epoch)

    def _normalize_position(self) -> None:
        """An offset at (or past) the end of an epoch is the start of a later one."""
        while self._offset >= self.plan_for(self._epoch).batches_per_epoch:
            self._offset -= self.plan_for(self._epoch).batches_per_epoch
            self._epoch += 1

    @property
    def batches_per_epoch(self) -> int:
        """Batches of the current epoch (the same on every rank; fewer once shards are quarantined)."""
        return self.plan_for(self._epoch).batches_per_epoch

    # -- position ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Position of the NEXT batch (plus the quarantined shards, if any), in plain types: build a loader
        with start_epoch/start_offset/quarantine from it to resume."""
        out: dict[str, Any] = {"epoch": self._epoch, "offset": self._offset}
        if self._quarantine:
            out["quarantine"] = dict(self._quarantine)
        return out

    def restore_faults(self, quarantine: dict[str, int]) -> None:
        """Apply a saved quarantine (from `state()`), before the first batch."""
        if self._stream is not None:
            raise RuntimeError("restore_faults must come before the first batch")
        for name, epoch in quarantine.items():
            i = self.shards.index_of.get(name)
            if i is None:
                log.warning("quarantined shard %s is not in the manifest any more: ignored", name)
                continue
            self._quarantine[name] = int(epoch)
            self.shards.mark_bad(i, "quarantined earlier in this run")
        self._normalize_position()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        """Unusable samples met in the batches yielded so far (a sample met in two epochs counts twice)."""
        return self._stats.skipped

    @property
    def skipped_keys(self) -> dict[str, str]:
        """Bad samples met so far (not those of unreadable shards) -> cause."""
        with self._stats.lock:
            return dict(self._stats.keys)

    @property
    def fault_time(self) -> tuple[int, float]:
        """(batches DALI failed on and PIL decoded instead, seconds those cost: rebuild + CPU decode)."""
        return self._dali_fallbacks, self._fault_s

    @property
    def quarantine(self) -> dict[str, int]:
        return dict(self._quarantine)

    def sync_faults(self, max_bad_fraction: float = 0.01) -> dict[str, float]:
        """Agree with every other rank on the bad shards and quarantine them from the next epoch; raise
        faults.DataFaultError past `max_bad_fraction` (carrying the same metrics). A collective: every rank
        calls it at the same step. Returns the metrics data/skipped, data/bad_shards and data/bad_samples
        (sums over ranks)."""
        names = [s.name for s in self.shards.manifest.shards]
        mine = set(self.shards.bad) | {self.shards.index_of[n] for n in self._quarantine}
        with self._stats.lock:
            skipped, distinct = self._stats.skipped, len(self._stats.keys)
        agreed = faults.agree(len(names), mine, skipped, distinct, self.device, self.plan.world_size)
        new = [i for i in sorted(agreed.bad_shards) if names[i] not in self._quarantine]
        for i in new:
            self.shards.mark_bad(i, "reported by another rank")
            self._quarantine[names[i]] = self._epoch + 1
        reasons = dict(self.shards.bad)
        faults.check_budget(names, self.shards.counts, agreed, reasons, max_bad_fraction)
        if new:
            log.warning("quarantined from epoch %d on: %s", self._epoch + 1, ", ".join(names[i] for i in new))
            self._restart()  # batches read ahead for the next epoch used the old schedule
        return faults.metrics(agreed)

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> ShardLoader:
        return self

    def _start(self) -> None:
        stream = _Stream(self.prefetch)
        stream.producer = _Producer(self.shards, self._schedule, self.rank, self._epoch, self._offset, self._pil,
                                    stream, self._known_bad)
        self._boxes.append(stream)
        self._stream = stream
        if self._dali is not None:
            self._dali.attach(stream.next_raw, _dali_inputs)
        stream.producer.start()

    def _restart(self) -> None:
        if self._stream is not None:
            self._stream.shutdown(join=True)
            self._boxes.remove(self._stream)
            self._stream = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise RuntimeError("loader is closed")
        if self._stream is None:
            self._start()
        if self._dali is not None:
            t = time.perf_counter()
            images, labels, raw, error = self._dali.next()
            if images is None:
                images, labels = self._decode_on_cpu(raw, error)
                self._fault_s += time.perf_counter() - t
        else:
            raw = self._stream.next_raw()
            images = to_unit_range(raw.images, self.device)
            labels = torch.from_numpy(raw.labels).to(self.device, non_blocking=True)
        for key, cause, lost in raw.bad:
            self._stats.record(key, cause, lost)
        self._offset += 1
        if self._offset >= self.plan_for(self._epoch).batches_per_epoch:
            self._epoch, self._offset = self._epoch + 1, 0
        return images, labels

    def _decode_on_cpu(self, raw: _RawBatch, error: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch DALI failed on: find the culprits with PIL, replace them as the producer would have had it
        known them, and hand the repaired batch to DALI again (first in line). The batch is then exactly
        what a run that knew the culprits beforehand decodes, so a resumed run, which has forgotten them,
        still matches. Only if DALI fails again, or PIL finds no culprit, is the PIL decode served."""
        self._dali_fallbacks += 1
        if self._pil is None:
            self._pil = PilDecoder(self.resolution, self.num_threads, pin_memory=self.device.type == "cuda")
        images, errors = self._pil.decode(raw.jpgs, raw.aug)
        for gid, e in zip(raw.ids, errors):
            if e is not None:  # the producer skips it from now on: DALI fails on it once per process
                self._known_bad[gid] = f"DALI failed on its batch; PIL: {e}"
        samples = [Sample(self.shards.key(g), None, -1, None) for g in raw.ids]
        bad = replace_bad(errors, samples, raw.jpgs, raw.labels, raw.ids, images)
        if len(bad) == len(samples):
            raise RuntimeError(f"DALI and PIL both failed on every sample of batch {raw.offset} of epoch "
                               f"{raw.epoch} ({error})")
        raw.bad += [(k, f"DALI failed on its batch; PIL: {c}", lost) for k, c, lost in bad]
        if bad:
            self._dali.replay.appendleft(raw)
            again, labels, back, error2 = self._dali.next()
            if again is not None:
                return again, labels
            raw, error = back, error2
            log.warning("DALI failed again on repaired batch %d of epoch %d: served by PIL (%s)", raw.offset,
                        raw.epoch, error)
        else:
            log.warning("DALI failed on batch %d of epoch %d but PIL decodes all of it: served by PIL (%s)",
                        raw.offset, raw.epoch, error)
        return to_unit_range(images, self.device), torch.from_numpy(raw.labels).to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the background reader and release the decoder (also done when the loader is collected)."""
        self._closed = True
        self.shards.closed = True  # a read still in flight must not mark (and log) shards bad
        self._finalizer.detach()
        for stream in self._boxes:
            stream.shutdown(join=True)
        if self._pil is not None:
            self._pil.close()
        if self._dali is not None:
            self._dali.close()

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardLoader({self.shards.url!r}, backend={self.backend}, rank={self.rank}/"
                f"{self.plan.world_size}, batch={self.batch_size}, batches_per_epoch={self.batches_per_epoch}, "
                f"state={self.state()})")


def _dali_inputs(batch: _RawBatch) -> tuple:
    """Raw batch -> the external source's outputs."""
    a = batch.aug
    jpgs = [np.frombuffer(j, np.uint8) for j in batch.jpgs]
    serial = np.full(len(jpgs), batch.serial, np.int64)
    return jpgs, a.crop_frac, a.crop_x, a.crop_y, a.flip, batch.labels, serial


def _abandon(streams: list[_Stream]) -> None:
    """A dropped loader's finalizer. The garbage collector runs it on whatever thread it interrupts, possibly
    one inside a lock that stopping would take (inside the decode pool's own submit, which holds that pool's
    shutdown lock and the lock every pool's submit takes: the whole process hung), so it takes none: the
    producers see the flag within 0.1 s and clean up on their own threads; the decode pool's idle workers exit
    when the collector frees it."""
    for stream in list(streams):
        stream.abandoned = True


def build_loader(
    shards: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    seed: int = 0,
    resolution: int | None = None,
    random_crop: bool = False,
    flip: bool = True,
    num_threads: int = 1,
    start_epoch: int = 0,
    start_offset: int = 0,
    drop_last: bool = True,
    shuffle_window: int = 4096,
    min_crop: float = 0.8,
    prefetch: int = 2,
    io_threads: int = 4,
    storage_options: dict[str, Any] | None = None,
    quarantine: dict[str, int] | None = None,
) -> ShardLoader:
    """A loader over the shard set at `shards` (a folder or fsspec URL holding manifest.json).

    Yields (images, labels): float32 (N, 3, R, R) in [-1, 1] and int64 (N,), both on `device`, forever
    (epochs reshuffle with seed and epoch). `resolution` defaults to the manifest's. `random_crop` takes a
    square of [min_crop, 1] x the short side at a random place (else the center square); `flip` mirrors half
    the images. `shuffle_window` samples of a rank's slice are shuffled together; `io_threads` range reads
    run at once (raise it for s3); `storage_options` go to fsspec (e.g. {"endpoint_url": ...}).
    `quarantine` is the one of a saved `state()` (shards left out after faults, see faults.py).
    """
    device = torch.device(device)
    shard_set = ShardSet(shards, storage_options, io_threads=io_threads)
    plan = EpochPlan(shard_set.counts, batch_size, world_size, seed, drop_last, shuffle_window, random_crop,
                     min_crop, flip)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return ShardLoader(shard_set, plan, rank=rank, device=device, backend=backend,
                       resolution=resolution or shard_set.manifest.resolution, num_threads=num_threads,
                       start_epoch=start_epoch, start_offset=start_offset, prefetch=prefetch,
                       quarantine=quarantine)
