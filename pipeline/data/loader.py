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
A sample that cannot be used (bad label, not a JPEG, truncated, PIL cannot decode it) is skipped: logged
with its key and cause, counted in `.skipped`, and its slot in the batch is filled with another sample of
the same batch, so batch shapes and positions never move.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data.backends import DaliDecoder, PilDecoder, QueueSource, dali_available, to_unit_range
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
    jpgs: list[bytes]
    labels: np.ndarray  # int64
    aug: AugParams
    images: torch.Tensor | None = None  # uint8 NHWC, decoded already ("wds")
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, cause) of samples replaced in this batch


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.skipped = 0
        self.keys: dict[str, str] = {}

    def record(self, key: str, cause: str) -> None:
        with self.lock:
            self.skipped += 1
            first = key not in self.keys
            self.keys.setdefault(key, cause)
        if first:
            log.warning("skipping sample %s: %s", key, cause)


class _Producer(threading.Thread):
    """Reads, checks (and for "wds" decodes) batches in schedule order into a bounded queue."""

    def __init__(self, shards: ShardSet, plan: EpochPlan, rank: int, epoch: int, offset: int,
                 decoder: PilDecoder | None, out: queue.Queue, stop: threading.Event):
        super().__init__(name=f"shard-producer-r{rank}", daemon=True)
        self.shards, self.plan, self.rank = shards, plan, rank
        self.epoch, self.offset = epoch, offset
        self.decoder, self.out, self.stop = decoder, out, stop
        self.num_classes = len(shards.manifest.classes)
        self.io = ThreadPoolExecutor(1, thread_name_prefix="shard-window")
        self.orders: dict[int, np.ndarray] = {}
        self.windows: dict[tuple[int, int], Future] = {}

    def run(self) -> None:
        try:
            epoch, offset = self.epoch, self.offset
            while not self.stop.is_set():
                for b in range(offset, self.plan.batches_per_epoch):
                    if not self._put(self._batch(epoch, b)):
                        return
                epoch, offset = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            if self.stop.is_set():
                return  # closed while reading: nothing to report
            log.exception("data loading failed")
            self._put(RuntimeError(f"data loading failed: {type(e).__name__}: {e}"))
        finally:
            self.io.shutdown(wait=False, cancel_futures=True)

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
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
            self.orders[epoch] = self.plan.rank_order(epoch, self.rank)
        return self.orders[epoch]

    def _window(self, epoch: int, w: int) -> dict[int, Sample]:
        """Samples of window w of `epoch`; also starts reading the next window in the background."""
        n_windows = -(-self.plan.samples_per_rank // max(1, self.plan.shuffle_window))
        nxt = (epoch, w + 1) if w + 1 < n_windows else (epoch + 1, 0)
        for key in ((epoch, w), nxt):
            if key not in self.windows:
                size = max(1, self.plan.shuffle_window)
                ids = self._order(key[0])[key[1] * size : (key[1] + 1) * size]
                self.windows[key] = self.io.submit(self.shards.read, ids)
        for key in [k for k in self.windows if k < (epoch, w)]:
            del self.windows[key]
        return self.windows[(epoch, w)].result()

    def _batch(self, epoch: int, b: int) -> _RawBatch:
        plan = self.plan
        order = self._order(epoch)
        pos = np.arange(b * plan.batch_size, (b + 1) * plan.batch_size)
        samples: list[Sample] = []
        for p, gid in zip(pos.tolist(), order[pos].tolist()):
            samples.append(self._window(epoch, plan.window_of(p))[gid])
        jpgs = [s.jpg or b"" for s in samples]
        labels = np.asarray([s.label for s in samples], np.int64)
        strict = self.decoder is None  # DALI cannot skip a bad JPEG; PIL finds truncation when decoding
        errors = [s.error or _check(s, self.num_classes, strict) for s in samples]
        aug = plan.aug_params(epoch, self.rank, b)
        images = None
        if self.decoder is not None:
            images, decode_errors = self.decoder.decode([j if e is None else b"" for j, e in zip(jpgs, errors)], aug)
            errors = [e or d for e, d in zip(errors, decode_errors)]
        good = [i for i, e in enumerate(errors) if e is None]
        bad: list[tuple[str, str]] = []
        if len(good) < len(errors):
            if not good:
                raise RuntimeError(f"no usable sample in batch {b} of epoch {epoch}: {samples[0].key}: {errors[0]}")
            for i, e in enumerate(errors):
                if e is None:
                    continue
                bad.append((samples[i].key, e))
                j = max((g for g in good if g < i), default=good[0])  # the nearest usable one before it
                jpgs[i], labels[i] = jpgs[j], labels[j]
                if images is not None:
                    images[i] = images[j]
        return _RawBatch(epoch, b, jpgs, labels, aug, images, bad)


def _check(s: Sample, num_classes: int, strict: bool) -> str | None:
    """Cheap checks before a decoder sees the bytes. `strict` (DALI, which cannot skip a bad JPEG) also wants
    the end-of-image marker last, which rejects a truncated file but also a valid one with trailing data."""
    if not 0 <= s.label < num_classes:
        return f"label {s.label} outside 0..{num_classes - 1}"
    if not s.jpg:
        return "empty .jpg"
    if not s.jpg.startswith(b"\xff\xd8\xff"):
        return "not a JPEG (no SOI marker)"
    if strict and not s.jpg.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated JPEG (no EOI marker)"
    return None


class ShardLoader:
    """An infinite stream of (images, labels) from a shard set; see the module docstring."""

    def __init__(self, shards: ShardSet, plan: EpochPlan, *, rank: int, device: torch.device, backend: str,
                 resolution: int, num_threads: int, start_epoch: int, start_offset: int, prefetch: int = 2):
        if start_epoch < 0 or start_offset < 0:
            raise ValueError("start_epoch and start_offset must be >= 0")
        self.shards, self.plan, self.rank, self.device = shards, plan, rank, device
        self.resolution = resolution
        self.class_names = list(shards.manifest.classes)
        self.num_classes = len(self.class_names)
        self.batches_per_epoch = plan.batches_per_epoch
        self.batch_size = plan.batch_size
        # an offset at (or past) the end of an epoch is the start of a later one
        self._epoch = start_epoch + start_offset // plan.batches_per_epoch
        self._offset = start_offset % plan.batches_per_epoch
        self._stats = _Stats()
        self._in_dali: deque[list[tuple[str, str]]] = deque()  # `bad` of batches handed to DALI, in order
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._producer: _Producer | None = None
        self._pil: PilDecoder | None = None
        self._dali: DaliDecoder | None = None
        chosen = pick_backend(backend, device)
        if chosen.startswith("dali"):
            try:
                source = QueueSource(self._queue, _DaliInputs(self._in_dali))
                self._dali = DaliDecoder(resolution, plan.batch_size, num_threads, device, source,
                                         gpu=chosen == "dali-gpu")
            except Exception as e:
                if backend != "auto":
                    raise
                log.warning("DALI pipeline unavailable (%s: %s): using the wds backend", type(e).__name__, e)
                chosen = "wds"
        if chosen == "wds":
            self._pil = PilDecoder(resolution, num_threads, pin_memory=device.type == "cuda")
        self.backend = chosen
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._pil)

    # -- position ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """Position of the NEXT batch: build a loader with start_epoch/start_offset from it to resume."""
        return {"epoch": self._epoch, "offset": self._offset}

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        """Unusable samples met in the batches yielded so far (a sample met in two epochs counts twice)."""
        return self._stats.skipped

    @property
    def skipped_keys(self) -> dict[str, str]:
        with self._stats.lock:
            return dict(self._stats.keys)

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stop.is_set():
            raise RuntimeError("loader is closed")
        if self._producer is None:
            self._producer = _Producer(self.shards, self.plan, self.rank, self._epoch, self._offset, self._pil,
                                       self._queue, self._stop)
            self._producer.start()
        if self._dali is not None:
            images, labels = self._dali.next()
            bad = self._in_dali.popleft()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            images = to_unit_range(item.images, self.device)
            labels = torch.from_numpy(item.labels).to(self.device, non_blocking=True)
            bad = item.bad
        for key, cause in bad:
            self._stats.record(key, cause)
        self._offset += 1
        if self._offset == self.batches_per_epoch:
            self._epoch, self._offset = self._epoch + 1, 0
        return images, labels

    def close(self) -> None:
        """Stop the background reader and release the decoder (also done when the loader is collected)."""
        self._finalizer()
        if self._producer is not None:
            self._producer.join(timeout=5)
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


class _DaliInputs:
    """Raw batch -> external source outputs; notes the batch's skipped samples for when DALI returns it."""

    def __init__(self, pending: deque):
        self.pending = pending

    def __call__(self, batch: _RawBatch) -> tuple:
        self.pending.append(batch.bad)
        a = batch.aug
        jpgs = [np.frombuffer(j, np.uint8) for j in batch.jpgs]
        return jpgs, a.crop_frac, a.crop_x, a.crop_y, a.flip, batch.labels


def _shutdown(stop: threading.Event, q: queue.Queue, pil: PilDecoder | None) -> None:
    stop.set()
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    if pil is not None:
        pil.close()


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
) -> ShardLoader:
    """A loader over the shard set at `shards` (a folder or fsspec URL holding manifest.json).

    Yields (images, labels): float32 (N, 3, R, R) in [-1, 1] and int64 (N,), both on `device`, forever
    (epochs reshuffle with seed and epoch). `resolution` defaults to the manifest's. `random_crop` takes a
    square of [min_crop, 1] x the short side at a random place (else the center square); `flip` mirrors half
    the images. `shuffle_window` samples of a rank's slice are shuffled together; `io_threads` range reads
    run at once (raise it for s3); `storage_options` go to fsspec (e.g. {"endpoint_url": ...}).
    """
    device = torch.device(device)
    shard_set = ShardSet(shards, storage_options, io_threads=io_threads)
    plan = EpochPlan(shard_set.counts, batch_size, world_size, seed, drop_last, shuffle_window, random_crop,
                     min_crop, flip)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return ShardLoader(shard_set, plan, rank=rank, device=device, backend=backend,
                       resolution=resolution or shard_set.manifest.resolution, num_threads=num_threads,
                       start_epoch=start_epoch, start_offset=start_offset, prefetch=prefetch)
