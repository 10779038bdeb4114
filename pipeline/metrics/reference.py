"""Reference statistics of the real images: computed once per (extractor, resolution, count), then cached.

The cache is one .npz next to the data manifest, `fid_stats_<extractor>_<resolution>_<count>.npz`, holding
mu and sigma (float64) of the features, a uniform random subset of the feature rows (float32, at most
`keep_features` of them) for precision/recall, and a few metadata fields. It is written atomically (a
temporary file renamed into place; on object stores a single put), and reused whenever it exists.
A feature space used only for precision/recall (VGG16) keeps the rows without the moments (`moments=False`,
empty mu and sigma) in `pr_features_<extractor>_<resolution>_<count>.npz`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.frechet import FeatureStats

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_KEEP_FEATURES = 10_000


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64; (0,) when computed without moments
    sigma: np.ndarray  # (D, D) float64; (0, 0) when computed without moments
    count: int  # real images the statistics were computed from
    extractor: str  # FeatureExtractor.name
    resolution: int
    features: np.ndarray | None = None  # (M, D) float32 random subset for precision/recall, M <= count

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = {"version": FORMAT_VERSION, "count": self.count, "extractor": self.extractor, "resolution": self.resolution}
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(meta))}
        if self.features is not None:
            arrays["features"] = self.features
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        with _open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            meta = json.loads(str(data["meta"]))
            return cls(
                mu=data["mu"], sigma=data["sigma"], count=int(meta["count"]), extractor=meta["extractor"],
                resolution=int(meta["resolution"]), features=data["features"] if "features" in data.files else None,
            )

    def save(self, path: str | os.PathLike) -> None:
        _write_atomic(path, self.to_npz_bytes())


def reference_stats_path(data_dir: str | os.PathLike, extractor: FeatureExtractor | str, resolution: int, count: int,
                         prefix: str = "fid_stats") -> str:
    """Where the cache for these statistics lives: <data_dir>/<prefix>_<extractor>_<res>_<count>.npz."""
    name = extractor if isinstance(extractor, str) else extractor.name
    return f"{str(data_dir).rstrip('/')}/{prefix}_{name}_{int(resolution)}_{int(count)}.npz"


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _open(path: str | os.PathLike, mode: str):
    if _is_url(path):
        import fsspec

        return fsspec.open(str(path), mode).open()
    return open(str(path).removeprefix("file://"), mode)


def _exists(path: str | os.PathLike) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(path))
        return fs.exists(p)
    return Path(str(path).removeprefix("file://")).is_file()


def _write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    if _is_url(path):
        with _open(path, "wb") as f:  # object stores replace an object in one put
            f.write(payload)
        return
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Reservoir:
    """Uniform random sample of at most `size` rows from a stream (algorithm R), seeded."""

    def __init__(self, size: int, seed: int):
        self.size, self.seen, self.rows = size, 0, None
        self.rng = np.random.default_rng(seed)

    def add(self, batch: np.ndarray) -> None:
        if self.size <= 0:
            return
        if self.rows is None:
            self.rows = np.empty((self.size, batch.shape[1]), np.float32)
        for row in batch:
            if self.seen < self.size:
                self.rows[self.seen] = row
            else:
                j = self.rng.integers(0, self.seen + 1)
                if j < self.size:
                    self.rows[j] = row
            self.seen += 1

    def result(self) -> np.ndarray | None:
        if self.rows is None:
            return None
        rows = self.rows[: min(self.seen, self.size)]
        # NOTE: slots are not exchangeable in algorithm R; shuffling makes every prefix a uniform subset
        return rows[self.rng.permutation(len(rows))]


def _images_of(batch: Tensor | tuple | list | dict) -> Tensor:
    if isinstance(batch, dict):
        batch = batch.get("images", batch.get("image"))
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    images = torch.as_tensor(batch)
    if images.dtype == torch.uint8:  # 8-bit NCHW -> [-1, 1]
        images = images.float() / 127.5 - 1.0
    return images


@torch.no_grad()
def compute_reference_stats(
    image_batches: Iterable[Tensor | tuple],
    extractor: FeatureExtractor,
    *,
    max_images: int | None = None,
    keep_features: int = DEFAULT_KEEP_FEATURES,
    seed: int = 0,
    moments: bool = True,  # False: only the kept rows (a feature space for precision/recall only)
) -> ReferenceStats:
    """Feature statistics of real images; batches are (N, C, R, R) tensors in [-1, 1] or (images, labels)."""
    stats, keep = FeatureStats(), _Reservoir(keep_features, seed)
    resolution, count = 0, 0
    for batch in image_batches:
        images = _images_of(batch)
        if max_images is not None:
            images = images[: max_images - count]
        if images.shape[0] == 0:
            break
        resolution = int(images.shape[-1])
        feats = extractor.features(images).numpy()
        if moments:
            stats.update(feats)
        keep.add(feats)
        count += images.shape[0]
        if max_images is not None and count >= max_images:
            break
    if count < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {count}")
    if not moments:
        return ReferenceStats(np.zeros(0), np.zeros((0, 0)), count, extractor.name, resolution, keep.result())
    return ReferenceStats(stats.mean, stats.cov, stats.count, extractor.name, resolution, keep.result())


def reference_stats(
    image_batches: Iterable[Tensor | tuple],
    extractor: FeatureExtractor,
    cache_path: str | os.PathLike,
    *,
    max_images: int | None = None,  # stop after this many images (None = the whole iterable; set it for endless loaders)
    keep_features: int = DEFAULT_KEEP_FEATURES,  # feature rows kept for precision/recall
    seed: int = 0,  # for the random subset of kept rows
    moments: bool = True,  # False: kept rows only, no mu/sigma (see compute_reference_stats)
) -> ReferenceStats:
    """Load the cached statistics at cache_path, or compute them from image_batches and cache them there.

    The iterable is not touched when the cache exists. A cache made with another extractor is an error.
    Feed un-augmented images (no random flips or crops) in the same [-1, 1] range G produces; (images,
    labels) tuples, {"images": ...} dicts and uint8 NCHW batches are accepted too.
    """
    if _exists(cache_path):
        ref = ReferenceStats.load(cache_path)
        if ref.extractor != extractor.name:
            raise ValueError(
                f"{cache_path} holds statistics for extractor {ref.extractor!r}, not {extractor.name!r}; "
                "delete it or use another path"
            )
        logger.info("reference statistics: reusing %s (%d images)", cache_path, ref.count)
        return ref
    ref = compute_reference_stats(image_batches, extractor, max_images=max_images, keep_features=keep_features,
                                  seed=seed, moments=moments)
    ref.save(cache_path)
    logger.info("reference statistics: wrote %s (%d images, %s)", cache_path, ref.count, extractor.name)
    return ref
