"""The on-disk format shared by the shard writer (data_prep) and the loader (pipeline.data).

A shard set is a folder (local path or fsspec URL) holding:

    manifest.json              what the set holds: classes, resolution, per-shard counts and sha256, skipped inputs
    shard-000000.tar           WebDataset tar: <key>.jpg (JPEG) and <key>.cls (class index, ASCII) per sample
    shard-000000.idx           DALI index (the `wds2idx` format, v1.2): one line per sample, component offsets
    shard-000000.json          sidecar: sha256 and the spec the shard was built from (lets a re-run skip it)

This module knows only the format and where bytes live; it needs neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

FORMAT = "biggan-wds/1"
MANIFEST_NAME = "manifest.json"
INDEX_VERSION = "v1.2"  # the version line DALI's readers.webdataset expects (what wds2idx writes)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def sidecar_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- manifest ------------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    name: str  # tar file name, relative to the set's folder
    count: int  # samples in the tar
    sha256: str  # of the whole tar file
    bytes: int
    index: str | None = None  # DALI index file name, None if the set has none
    url: str | None = None  # where the tar is when it is not next to the manifest (index_shards: in place)


@dataclass
class Manifest:
    classes: list[str]  # class index -> name
    resolution: int  # side of the stored images (max_side unset) or of the training crops (max_side set)
    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"path": ..., "reason": ...}]
    num_samples: int = 0
    format: str = FORMAT
    max_side: int | None = None  # set when images keep their aspect ratio (random-crop training)
    quality: int | None = None  # JPEG quality the shards were written with
    seed: int | None = None  # seed of the order images were spread over shards in
    source: str = ""
    class_counts: list[int] = field(default_factory=list)
    index_tool: str = ""  # "wds2idx" or "builtin" (the same format written by this package)
    image_keys: list[str] = field(default_factory=lambda: ["jpg"])  # a sample's image: the first of these present
    label_key: str = "cls"  # "cls" (ASCII class index) or "json"
    label_field: str = ""  # label_key "json": the field holding the class index
    stats: dict | None = field(default=None, repr=False, compare=False)  # of the run that wrote it; not saved

    def __post_init__(self) -> None:
        known = set(ShardInfo.__dataclass_fields__)
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**{k: v for k, v in s.items() if k in known})
                       for s in self.shards]
        if not self.num_samples:
            self.num_samples = sum(s.count for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("stats")
        # fields at their defaults are left out, so readers that predate them still read the set
        for key, default in _OPTIONAL_FIELDS.items():
            if data.get(key) == default:
                data.pop(key)
        for shard in data["shards"]:
            if shard.get("url") is None:
                shard.pop("url", None)
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        classes = data.get("classes", [])
        if isinstance(classes, dict):  # {"0": name, ...} from another writer
            data["classes"] = [classes[str(i)] for i in range(len(classes))]
        known = {f for f in cls.__dataclass_fields__} - {"stats"}
        return cls(**{k: v for k, v in data.items() if k in known})


_OPTIONAL_FIELDS = {"image_keys": ["jpg"], "label_key": "cls", "label_field": ""}


# -- storage -------------------------------------------------------------------------------------------------
class Store:
    """A folder of files, local or behind fsspec (s3://...), with atomic whole-file writes.

    Local writes go to a temporary name in the same folder and are renamed into place. Object stores make a
    PUT visible only once it is complete, so a remote write uploads straight to the final key.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.storage_options = dict(storage_options or {})

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        else:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except Exception:  # noqa: BLE001 - a bucket prefix needs no mkdir; some stores refuse it
                pass

    # NOTE: fsspec caches listings per process; other processes (Ray workers) write here, so ask afresh
    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.path(name))
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        self.fs.invalidate_cache(self.path(name))
        return int(self.fs.size(self.path(name)))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(name), start=start, end=end)

    def listdir(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.local:
            tmp = self.path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        else:
            self.fs.pipe_file(self.path(name), data)

    def put_file(self, local_path: str, name: str) -> None:
        """Move (local) or upload (remote) a finished local file to `name`."""
        if self.local:
            os.replace(local_path, self.path(name))
        else:
            self.fs.put_file(local_path, self.path(name))
            os.remove(local_path)

    def temp_path(self, name: str) -> str:
        """A scratch file path to build `name` in: in the target folder when local (so rename is atomic)."""
        if self.local:
            return self.path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        fd, path = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp")
        os.close(fd)
        return path

    def sha256(self, name: str) -> str:
        if self.local:
            return sha256_file(self.path(name))
        h = hashlib.sha256()
        with self.fs.open(self.path(name), "rb", block_size=8 << 20) as f:
            while block := f.read(8 << 20):
                h.update(block)
        return h.hexdigest()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    store = Store(url, storage_options)
    try:
        return Manifest.from_json(store.read_bytes(MANIFEST_NAME))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {url}: run `python -m data_prep.make_shards` first") from e


# -- DALI index files ----------------------------------------------------------------------------------------
@dataclass
class IndexEntry:
    key: str
    components: dict[str, tuple[int, int]]  # extension -> (data offset in the tar, size in bytes)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the file name, the rest is the extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_from_tar(fileobj: io.BufferedIOBase) -> list[IndexEntry]:
    """Scan a tar (read front to back, so a stream will do) into index entries, grouping consecutive members
    by key. A truncated tar raises tarfile.ReadError."""
    entries: list[IndexEntry] = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/") or key.rsplit("/", 1)[-1] == "":
                continue
            if not entries or entries[-1].key != key:
                entries.append(IndexEntry(key, {}))
            entries[-1].components[ext] = (member.offset_data, member.size)
    return entries


def format_index(entries: list[IndexEntry]) -> str:
    """The v1.2 text format: a header `v1.2 N`, then per sample `ext offset size name` for each component."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for e in entries:
        parts = [f"{ext} {off} {size} {e.key}.{ext}" for ext, (off, size) in e.components.items()]
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[IndexEntry]:
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    header = lines[0].split()
    if len(header) != 2 or not header[0].startswith("v1"):
        raise ValueError(f"not a DALI webdataset index (header {lines[0]!r})")
    n = int(header[1])
    entries: list[IndexEntry] = []
    for line in lines[1 : n + 1]:
        tok = line.split()
        if len(tok) % 4:
            raise ValueError(f"bad index line {line!r}")  # names with spaces are not supported
        comps: dict[str, tuple[int, int]] = {}
        key = ""
        for i in range(0, len(tok), 4):
            ext, off, size, name = tok[i : i + 4]
            key = split_member_name(name)[0]
            comps[ext] = (int(off), int(size))
        entries.append(IndexEntry(key, comps))
    if len(entries) != n:
        raise ValueError(f"index says {n} samples but lists {len(entries)}")
    return entries


def write_index_file(tar_path: str, idx_path: str) -> str:
    """Write the DALI index of a local tar; returns the tool used.

    Prefers DALI's own `wds2idx` (its Python module, which ships in the DALI wheel), and falls back to
    `format_index(index_from_tar(...))`, which writes the same v1.2 format.
    """
    try:
        import wds2idx  # noqa: PLC0415 - optional, installed by nvidia-dali
    except ImportError:
        wds2idx = None
    if wds2idx is not None and hasattr(wds2idx, "IndexCreator"):
        try:
            with wds2idx.IndexCreator(tar_path, idx_path, verbose=False) as creator:
                creator.create_index()
            return "wds2idx"
        except Exception:  # noqa: BLE001 - e.g. an unexpected `tar` listing format: write it ourselves
            pass
    with open(tar_path, "rb") as f:
        text = format_index(index_from_tar(f))
    with open(idx_path, "w") as f:
        f.write(text)
    return "builtin"
