"""Checkpoints that are either whole or invisible.

A checkpoint is a folder `step-XXXXXXXX/` under the store's root (a local path or an fsspec URL such as
s3://bucket/run/checkpoints). Every rank stages its files locally, then publishes them; rank 0 writes the
`COMMITTED` file last, listing every file with its size and sha256. A folder without a valid `COMMITTED`
(a crash mid-save, a half upload) is never loaded and is swept away by retention. On a local filesystem the
folder is also built under a `.partial` name and renamed, so even a listing never shows a half checkpoint.

`labels.json` at the root records which checkpoints are healthy (the health monitor's verdict) and which one
is the best by FID; retention never deletes the newest healthy or the best one.
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
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMITTED"
LABELS_FILE = "labels.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
            if self.fs.exists(path) and not self._committed(path):
                self.fs.rm(path, recursive=True)
        self.fs.makedirs(target, exist_ok=True)

    def publish(self, step: int, local_dir: Path) -> None:
        """Every rank: copy its staged files into the checkpoint folder (not yet visible)."""
        target = self._staging_name(step)
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = file.relative_to(local_dir).as_posix()
            dest = f"{target}/{rel}"
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), dest)

    def commit(self, step: int, extra: dict | None = None) -> CheckpointInfo:
        """Rank 0, after every rank published: checksum everything, write COMMITTED last, make it visible."""
        target = self._staging_name(step)
        files = {}
        for path in sorted(self.fs.find(target)):
            rel = path[len(target) + 1 :]
            if rel == COMMIT_FILE:
                continue
            with self.fs.open(path, "rb") as f:
                h = hashlib.sha256()
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            files[rel] = {"size": self.fs.size(path), "sha256": h.hexdigest()}
        meta = {"step": step, "created": time.time(), "files": files, **(extra or {})}
        self._write_json(f"{target}/{COMMIT_FILE}", meta)
        if self.local:
            final = self.step_dir(step)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(target, final)
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
        else:
            with self.fs.open(path, "wb") as f:  # an object PUT is atomic
                f.write(payload)

    # -- reading --------------------------------------------------------------------------------------------------
    def _committed(self, folder: str) -> dict | None:
        path = f"{folder}/{COMMIT_FILE}"
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first. Incomplete folders are not listed."""
        if not self.fs.exists(self._root_path):
            return []
        out = []
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.match(name)
            if not m:
                continue
            meta = self._committed(f"{self._root_path}/{name}")
            if meta is not None:
                out.append(CheckpointInfo(int(m.group(1)), f"{self._root_path}/{name}", meta))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        found = self.list()
        return found[-1] if found else None

    def get(self, step: int) -> CheckpointInfo:
        meta = self._committed(self.step_dir(step))
        if meta is None:
            raise FileNotFoundError(f"no committed checkpoint for step {step} under {self.root}")
        return CheckpointInfo(step, self.step_dir(step), meta)

    def fetch(self, info: CheckpointInfo, local_dir: Path, verify: bool = True) -> Path:
        """Make the checkpoint readable at a local path, verifying every file against COMMITTED.

        A local store is read in place; a remote one is downloaded into local_dir.
        """
        if self.local:
            root = Path(info.path)
        else:
            root = Path(local_dir) / f"step-{info.step:08d}"
            if root.exists():
                shutil.rmtree(root)
            for rel in info.meta["files"]:
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{info.path}/{rel}", str(dest))
        for rel, rec in info.meta["files"].items():
            path = root / rel
            if not path.is_file() or path.stat().st_size != rec["size"]:
                raise CorruptCheckpointError(f"{info.path}: {rel} is missing or has the wrong size")
            if verify and _sha256(path) != rec["sha256"]:
                raise CorruptCheckpointError(f"{info.path}: {rel} does not match its checksum")
        return root

    # -- labels and retention ------------------------------------------------------------------------------------
    def labels(self) -> dict:
        try:
            with self.fs.open(f"{self._root_path}/{LABELS_FILE}", "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return {"healthy": [], "best": None}

    def mark_healthy(self, step: int) -> None:
        labels = self.labels()
        if step not in labels["healthy"]:
            labels["healthy"] = sorted([*labels["healthy"], step])
            self._write_json(f"{self._root_path}/{LABELS_FILE}", labels)

    def mark_best(self, step: int, score: float | None, metric: str = "fid") -> None:
        labels = self.labels()
        labels["best"] = {"step": step, metric: score, "metric": metric}
        self._write_json(f"{self._root_path}/{LABELS_FILE}", labels)

    def newest_healthy(self, before: int | None = None) -> CheckpointInfo | None:
        committed = {c.step: c for c in self.list()}
        steps = [s for s in self.labels()["healthy"] if s in committed and (before is None or s < before)]
        return committed[max(steps)] if steps else None

    def forget_after(self, step: int) -> None:
        """After a rollback to `step`: later checkpoints belong to the abandoned branch of the run."""
        for info in self.list():
            if info.step > step:
                self.fs.rm(info.path, recursive=True)
        labels = self.labels()
        labels["healthy"] = [s for s in labels["healthy"] if s <= step]
        if labels["best"] and labels["best"]["step"] > step:
            labels["best"] = None
        self._write_json(f"{self._root_path}/{LABELS_FILE}", labels)

    def apply_retention(self, keep_last: int) -> list[int]:
        """Delete all but the newest `keep_last`, the newest healthy and the best; sweep partial folders."""
        committed = self.list()
        labels = self.labels()
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


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint's files do not match its COMMITTED record."""
