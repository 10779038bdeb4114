"""Checkpoints that are either whole or invisible.

A checkpoint is a folder `step-XXXXXXXX/` under the store's root (a local path or an fsspec URL such as
s3://bucket/run/checkpoints). Every rank stages its files locally, then publishes them; rank 0 writes the
`COMMITTED` file last, listing every file with its size and sha256. A folder without a valid `COMMITTED`
(a crash mid-save, a half upload) is never loaded and is swept away by retention. On a local filesystem the
folder is also built under a `.partial` name and renamed, so even a listing never shows a half checkpoint.

`labels.json` at the root records which checkpoints are healthy (the health monitor's verdict) and which one
is the best by FID; retention never deletes the newest healthy or the best one.

Never losing the good copy: only "not found" means absent. Any other error reading `labels.json` or a
`COMMITTED` (a transient S3 error, a torn or invalid file) stops retention for that round instead of being
read as "nothing there". On a local store every file and folder is fsynced before `COMMITTED` is written.
A checkpoint that fails verification is quarantined (renamed to `quarantine/step-XXXXXXXX-<time>`, never
deleted) and the previous good one is used (`newest_good`). Digests are computed by the rank that wrote
each file and handed to `commit`, so rank 0 never re-reads the store to checksum it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMITTED"
LABELS_FILE = "labels.json"
QUARANTINE_DIR = "quarantine"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_EMPTY_LABELS = {"healthy": [], "best": None}


class StoreReadError(OSError):
    """Something in the store exists (or may exist) but could not be read: never taken as "absent".

    `permanent` is True when reading again cannot help (invalid JSON, a folder in place of the file); False
    for what may pass (a connection error, an S3 5xx)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint's files do not match its COMMITTED record, or a file in it is not safe to load."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digests(local_dir: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under local_dir: computed where the files were written."""
    local_dir = Path(local_dir)
    return {
        p.relative_to(local_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(local_dir.rglob("*")) if p.is_file()
    }


def _fsync_path(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _folders_up_to(folder: str, top: str) -> set[str]:
    """folder and each parent of it up to and including top (their entries name the new files and folders)."""
    out = {top}
    while folder.startswith(top + "/"):
        out.add(folder)
        folder = folder.rsplit("/", 1)[0]
    return out


def rng_state() -> dict:
    """The process's random streams as tensors and plain types (loadable with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointInfo:
    step: int
    path: str  # the folder in the store
    meta: dict  # the COMMITTED record


class CheckpointStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        # label changes made while labels.json could not be read: applied at the next successful read
        self._pending_labels: list[Callable[[dict], None]] = []
        self._labels_seen: dict | None = None  # the last labels read or written by this process

    # -- naming -------------------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        return f"{self._root_path}/step-{step:08d}"

    def _staging_name(self, step: int) -> str:
        return self.step_dir(step) + (".partial" if self.local else "")

    # -- writing --------------------------------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Rank 0, before any rank publishes: clear leftovers of an earlier failed save of this step."""
        target = self._staging_name(step)
        for path in {target, self.step_dir(step)}:
            if self.fs.exists(path) and self._read_committed(path) is None:
                self.fs.rm(path, recursive=True)
        if not self.local and self.fs.exists(f"{target}/{COMMIT_FILE}"):
            # re-saving a committed step (the commit right after a rollback) writes into that very folder on a
            # remote store: it stops being a checkpoint first, so old digests never describe new files
            self.fs.rm(f"{target}/{COMMIT_FILE}")
        self.fs.makedirs(target, exist_ok=True)

    def publish(self, step: int, local_dir: Path, files: Iterable[str] | None = None) -> None:
        """Every rank: copy its staged files (all, or the relative paths in `files`) into the checkpoint folder
        (not yet visible). On a local store each file and each folder is fsynced before this returns."""
        target = self._staging_name(step)
        local_dir = Path(local_dir)
        rels = sorted(files) if files is not None else sorted(
            p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()
        )
        folders = set()
        for rel in rels:
            dest = f"{target}/{rel}"
            folder = dest.rsplit("/", 1)[0]
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.put_file(str(local_dir / rel), dest)
            if self.local:
                _fsync_path(dest)
                folders |= _folders_up_to(folder, target)
        for folder in sorted(folders, key=len, reverse=True):
            _fsync_path(folder, directory=True)

    def commit(self, step: int, files: dict[str, dict], extra: dict | None = None) -> CheckpointInfo:
        """Rank 0, after every rank published: write COMMITTED last (listing `files`, the digests the writing
        ranks computed), then make the folder visible."""
        target = self._staging_name(step)
        if self.local:  # the folders of every rank's files are durable before COMMITTED names them
            folders = set().union(*(_folders_up_to(f"{target}/{rel}".rsplit("/", 1)[0], target) for rel in files))
            for folder in sorted(folders, key=len, reverse=True):
                _fsync_path(folder, directory=True)
        meta = {"step": step, "created": time.time(), "files": dict(sorted(files.items())), **(extra or {})}
        self._write_json(f"{target}/{COMMIT_FILE}", meta)
        if self.local:
            final = self.step_dir(step)
            replaced = f"{final}.replaced"
            if os.path.exists(final):  # re-saving a committed step: the old copy goes only once the new is in place
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(target, final)
            _fsync_path(self._root_path, directory=True)
            shutil.rmtree(replaced, ignore_errors=True)
        return CheckpointInfo(step, self.step_dir(step), meta)

    def _write_json(self, path: str, data: dict) -> None:
        payload = json.dumps(data, indent=1, default=str).encode()
        if self.local:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_path(os.path.dirname(path), directory=True)
        else:
            with self.fs.open(path, "wb") as f:  # an object PUT is atomic
                f.write(payload)

    # -- reading --------------------------------------------------------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        """None only when the file does not exist; StoreReadError for anything else that goes wrong."""
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - IsADirectoryError, PermissionError, S3 5xx, timeouts ...
            permanent = isinstance(err, IsADirectoryError | NotADirectoryError | PermissionError)
            raise StoreReadError(f"{path}: could not be read ({type(err).__name__}: {err})", permanent) from err
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreReadError(f"{path}: is not valid JSON ({err})", permanent=True) from err
        if not isinstance(data, dict):
            raise StoreReadError(f"{path}: is not a JSON object", permanent=True)
        return data

    def _read_committed(self, folder: str) -> dict | None:
        meta = self._read_json(f"{folder}/{COMMIT_FILE}")
        if meta is not None and not isinstance(meta.get("files"), dict):
            raise StoreReadError(f"{folder}/{COMMIT_FILE}: has no file list", permanent=True)
        return meta

    def _scan(self) -> tuple[list[CheckpointInfo], dict[int, StoreReadError]]:
        """(committed checkpoints oldest first, {step: why its COMMITTED could not be read})."""
        if not self.fs.exists(self._root_path):
            return [], {}
        out, unreadable = [], {}
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.match(name)
            if not m:
                continue
            try:
                meta = self._read_committed(f"{self._root_path}/{name}")
            except StoreReadError as err:
                unreadable[int(m.group(1))] = err
                continue
            if meta is not None:
                out.append(CheckpointInfo(int(m.group(1)), f"{self._root_path}/{name}", meta))
        return sorted(out, key=lambda c: c.step), unreadable

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first. Incomplete folders and unreadable COMMITTED files are not listed."""
        found, unreadable = self._scan()
        for step, why in unreadable.items():
            log.warning("checkpoint at step %d is not listed: %s", step, why)
        return found

    def latest(self) -> CheckpointInfo | None:
        found = self.list()
        return found[-1] if found else None

    def get(self, step: int) -> CheckpointInfo:
        meta = self._read_committed(self.step_dir(step))
        if meta is None:
            raise FileNotFoundError(f"no committed checkpoint for step {step} under {self.root}")
        return CheckpointInfo(step, self.step_dir(step), meta)

    def fetch(self, info: CheckpointInfo, local_dir: Path, verify: bool = True,
              files: Iterable[str] | None = None) -> Path:
        """Make the checkpoint's files (all, or the relative paths in `files`) readable at a local path,
        verifying each against COMMITTED. A local store is read in place; a remote one is downloaded into
        local_dir/step-XXXXXXXX (the caller deletes it when done)."""
        wanted = sorted(info.meta["files"] if files is None else files)
        unknown = [rel for rel in wanted if rel not in info.meta["files"]]
        if unknown:
            raise CorruptCheckpointError(f"{info.path}: COMMITTED does not list {unknown}")
        if self.local:
            root = Path(info.path)
        else:
            root = Path(local_dir) / f"step-{info.step:08d}"
            if root.exists():
                shutil.rmtree(root)
            for rel in wanted:
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{info.path}/{rel}", str(dest))
                except FileNotFoundError as err:
                    raise CorruptCheckpointError(f"{info.path}: {rel} is missing") from err
        for rel in wanted:
            rec = info.meta["files"][rel]
            path = root / rel
            if not path.is_file() or path.stat().st_size != rec["size"]:
                raise CorruptCheckpointError(f"{info.path}: {rel} is missing or has the wrong size")
            if verify and _sha256(path) != rec["sha256"]:
                raise CorruptCheckpointError(f"{info.path}: {rel} does not match its checksum")
        return root

    # -- the previous good copy ----------------------------------------------------------------------------------
    def quarantine(self, step: int, reason: str) -> str:
        """Move a checkpoint that failed verification out of the way (never deleted), and say why next to it."""
        dest = f"{self._root_path}/{QUARANTINE_DIR}/step-{step:08d}-{int(time.time())}"
        self.fs.makedirs(f"{self._root_path}/{QUARANTINE_DIR}", exist_ok=True)
        if self.local:
            os.replace(self.step_dir(step), dest)
            _fsync_path(self._root_path, directory=True)
        else:
            self.fs.mv(self.step_dir(step), dest, recursive=True)
        with self.fs.open(f"{dest}/QUARANTINED.txt", "wb") as f:
            f.write(f"{reason}\n".encode())
        log.error("quarantined the checkpoint of step %d as %s: %s", step, dest, reason)
        return dest

    def newest_good(self, before: int | None = None, healthy: bool = False,
                    on_quarantine: Callable[[int, str], None] | None = None) -> CheckpointInfo | None:
        """Rank 0: the newest committed checkpoint (before step `before`; labelled healthy if asked) whose
        COMMITTED reads and whose files are all there with their recorded sizes. Newer ones that fail are
        quarantined. The checksums are verified by each rank when it fetches the files it loads."""
        found, unreadable = self._scan()
        steps = {c.step: c for c in found}
        if healthy:
            labelled = set(self.labels()["healthy"])
            steps = {s: c for s, c in steps.items() if s in labelled}
        candidates = sorted([*steps, *(s for s in unreadable if not healthy)], reverse=True)
        for step in candidates:
            if before is not None and step >= before:
                continue
            if step in unreadable and not unreadable[step].permanent:
                raise unreadable[step]  # it may well be good: try again later rather than fall back
            problem = str(unreadable[step]) if step in unreadable else self._missing_files(steps[step])
            if problem is None:
                return steps[step]
            self.quarantine(step, problem)
            if on_quarantine is not None:
                on_quarantine(step, problem)
        return None

    def _missing_files(self, info: CheckpointInfo) -> str | None:
        try:
            listed = {p[len(info.path) + 1:]: d for p, d in
                      ((e["name"].rstrip("/"), e) for e in self.fs.find(info.path, detail=True).values())}
        except FileNotFoundError:
            return f"{info.path} is gone"
        for rel, rec in info.meta["files"].items():
            if rel not in listed:
                return f"{info.path}: {rel} is missing"
            if int(listed[rel].get("size", -1)) != rec["size"]:
                return f"{info.path}: {rel} has {listed[rel].get('size')} bytes, COMMITTED says {rec['size']}"
        return None

    # -- labels and retention ------------------------------------------------------------------------------------
    def _read_labels(self) -> dict:
        """labels.json as stored, with this process's unsaved changes applied; StoreReadError unless readable."""
        data = self._read_json(f"{self._root_path}/{LABELS_FILE}")
        labels = {**_EMPTY_LABELS, **(data or {})}
        labels["healthy"] = list(labels["healthy"])
        for change in self._pending_labels:
            change(labels)
        return labels

    def labels(self) -> dict:
        """The labels for reading. If labels.json cannot be read right now, what this process last saw (with its
        unsaved changes), and a warning: never an empty record that someone could write back."""
        try:
            labels = self._read_labels()
        except StoreReadError as err:
            log.warning("checkpoint labels: %s; using what this process last saw", err)
            labels = json.loads(json.dumps(self._labels_seen or _EMPTY_LABELS))
            for change in self._pending_labels:
                change(labels)
            return labels
        self._labels_seen = labels
        return labels

    def _update_labels(self, change: Callable[[dict], None]) -> None:
        """Read, change, write. When labels.json cannot be read it is left alone: the change waits in memory
        and goes out with the next update that can read it."""
        self._pending_labels.append(change)
        try:
            labels = self._read_labels()
        except StoreReadError as err:
            log.warning("checkpoint labels not updated (kept in memory until readable): %s", err)
            return
        self._write_json(f"{self._root_path}/{LABELS_FILE}", labels)
        self._pending_labels.clear()
        self._labels_seen = labels

    def mark_healthy(self, step: int) -> None:
        def change(labels: dict) -> None:
            if step not in labels["healthy"]:
                labels["healthy"] = sorted([*labels["healthy"], step])

        self._update_labels(change)

    def mark_best(self, step: int, score: float | None, metric: str = "fid") -> None:
        def change(labels: dict) -> None:
            labels["best"] = {"step": step, metric: score, "metric": metric}

        self._update_labels(change)

    def newest_healthy(self, before: int | None = None) -> CheckpointInfo | None:
        committed = {c.step: c for c in self.list()}
        steps = [s for s in self.labels()["healthy"] if s in committed and (before is None or s < before)]
        return committed[max(steps)] if steps else None

    def forget_after(self, step: int) -> None:
        """After a rollback to `step`: later checkpoints belong to the abandoned branch of the run."""
        for info in self.list():
            if info.step > step:
                self.fs.rm(info.path, recursive=True)

        def change(labels: dict) -> None:
            labels["healthy"] = [s for s in labels["healthy"] if s <= step]
            if labels["best"] and labels["best"]["step"] > step:
                labels["best"] = None

        self._update_labels(change)

    def apply_retention(self, keep_last: int) -> list[int]:
        """Delete all but the newest `keep_last`, the newest healthy and the best; sweep partial folders.
        Deletes nothing when labels.json or any COMMITTED cannot be read: it may name what must be kept."""
        try:
            committed, unreadable = self._scan()
            if unreadable:
                raise StoreReadError("; ".join(map(str, unreadable.values())))
            labels = self._read_labels()
        except Exception as err:  # noqa: BLE001 - listing errors too: when in doubt, keep everything
            log.warning("retention skipped, nothing deleted: %s", err)
            return []
        keep = {c.step for c in committed[-keep_last:]} if keep_last > 0 else set()
        if committed:
            keep.add(committed[-1].step)  # never delete the one a restart would resume from
        healthy = [s for s in labels["healthy"] if s in {c.step for c in committed}]
        if healthy:
            keep.add(max(healthy))
        if labels.get("best"):
            keep.add(labels["best"]["step"])
        removed = []
        for info in committed:
            if info.step not in keep:
                self.fs.rm(info.path, recursive=True)
                removed.append(info.step)
        if self.local and os.path.isdir(self._root_path):
            newest = committed[-1].step if committed else -1
            for name in os.listdir(self._root_path):
                m = re.match(r"^step-(\d{8})\.partial$", name)
                if m and int(m.group(1)) < newest:
                    shutil.rmtree(os.path.join(self._root_path, name), ignore_errors=True)
        if removed:
            log.info("retention removed checkpoints at steps %s", removed)
        return removed
