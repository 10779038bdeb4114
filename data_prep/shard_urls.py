"""Shard URLs the way WebDataset users write them: brace patterns, `pipe:` commands, object stores, http.

WebDataset's own pieces do the URL work: `expand_urls` (braces and `::` lists) and `gopen` (the `pipe:`,
`http(s)://` via curl and `gs://` via gsutil openers). Where fsspec knows the protocol (local paths, s3://,
http(s)://, gs:// with gcsfs) it is preferred, because training reads samples by byte range and fsspec can
seek; a `pipe:` command can only stream, so a range read streams from the start and discards the prefix.
"""

from __future__ import annotations

import os
from typing import IO, Any

import fsspec

STREAM_CHUNK = 1 << 20


def expand(pattern: str) -> list[str]:
    """'s3://b/train-{000000..000099}.tar' (or several patterns joined by '::') to the list of URLs."""
    from webdataset.shardlists import expand_urls  # noqa: PLC0415 - keeps the import cost off the loader

    urls = [u for u in expand_urls(pattern) if u]
    if not urls:
        raise ValueError(f"{pattern!r} names no shards")
    return urls


def streams_only(url: str) -> bool:
    """True for URLs only webdataset's gopen can open (no random access)."""
    if url.startswith("pipe:"):
        return True
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return True  # e.g. gs:// without gcsfs: gsutil through gopen
    return False


def open_stream(url: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A readable binary stream of the whole object."""
    if streams_only(url):
        from webdataset.gopen import gopen  # noqa: PLC0415

        return gopen(url, "rb")
    return fsspec.open(url, "rb", **(storage_options or {})).open()


def read_range(url: str, start: int, end: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Bytes [start, end) of the object (fewer if it is shorter)."""
    if not streams_only(url):
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return fs.cat_file(path, start=start, end=end)
    with open_stream(url) as f:
        skip = start
        while skip > 0:
            got = f.read(min(skip, STREAM_CHUNK))
            if not got:
                return b""
            skip -= len(got)
        return f.read(end - start)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    if streams_only(url):
        return True  # cannot ask without reading: a missing object fails when read
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def common_parent(urls: list[str]) -> str:
    """The longest folder prefix all URLs share ('' if none), so shard names can be short and unique."""
    prefix = os.path.commonprefix(urls)
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
