"""A first-in first-out queue of tracking calls that is bounded in memory: what does not fit spills to a local
JSON-lines file and comes back in order; past the file's limit new calls are dropped and counted.

What is still unsent when the tracker closes (the server stayed away longer than it waited) is kept:
`keep` writes it to a JSON-lines file in order, and a tracker of the same run that starts later `adopt`s that
file and sends it first, so an outage at the end of a run loses nothing that can be written down.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


def _line(item: tuple[str, tuple]) -> bytes | None:
    """One call as a JSON line; None for a call whose arguments JSON cannot hold (e.g. dataset inputs)."""
    try:
        return (json.dumps([item[0], list(item[1])]) + "\n").encode()
    except (TypeError, ValueError):
        return None


class Backlog:
    def __init__(self, spill_path: str | Path | None, max_memory: int = 10_000, max_spill_bytes: int = 256 << 20):
        self.memory: deque[tuple[str, tuple]] = deque()
        self.max_memory = max(1, max_memory)
        self.spill_path = Path(spill_path) if spill_path else None
        self.max_spill_bytes = max_spill_bytes
        self.spilled = 0  # calls waiting in the file
        self.dropped = 0  # calls refused because memory and file were full
        self._read_at = 0  # byte offset of the next spilled call
        self._warned = False

    def __len__(self) -> int:
        return len(self.memory) + self.spilled

    def append(self, item: tuple[str, tuple]) -> None:
        if not self.spilled and len(self.memory) < self.max_memory:
            self.memory.append(item)
            return
        if self.spill_path is not None and self._spill(item):
            return
        self.dropped += 1
        if not self._warned:
            self._warned = True
            log.warning("mlflow: tracking backlog full (%d in memory, %d spilled); dropping new calls",
                        len(self.memory), self.spilled)

    def _spill(self, item: tuple[str, tuple]) -> bool:
        line = _line(item)
        if line is None:  # cannot be written down: it waits in memory, in its place (such calls are rare)
            if not self.spilled:
                self.memory.append(item)
                return True
            return False
        size = self.spill_path.stat().st_size if self.spill_path.exists() else 0
        if size + len(line) > self.max_spill_bytes:
            return False
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "ab") as f:
            f.write(line)
        if not self.spilled:
            log.warning("mlflow: tracking backlog over %d calls; spilling to %s", self.max_memory, self.spill_path)
        self.spilled += 1
        return True

    def peek(self) -> tuple[str, tuple] | None:
        if not self.memory:
            self._refill()
        return self.memory[0] if self.memory else None

    def pop(self) -> None:
        self.memory.popleft()

    def clear(self) -> int:
        n = len(self)
        self.memory.clear()
        self.spilled, self._read_at = 0, 0
        if self.spill_path is not None and self.spill_path.exists():
            os.unlink(self.spill_path)
        return n

    def keep(self, path: str | Path) -> tuple[int, int]:
        """Write every call still queued, in order, to `path` (appended after what it holds) and empty the
        backlog. Returns (calls kept, calls that could not be written down)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = lost = 0
        with open(path, "ab") as out:
            for item in self.memory:
                line = _line(item)
                if line is None:
                    lost += 1
                else:
                    out.write(line)
                    kept += 1
            if self.spilled:
                with open(self.spill_path, "rb") as f:
                    f.seek(self._read_at)
                    for line in f:
                        out.write(line)
                        kept += 1
            out.flush()
            os.fsync(out.fileno())
        self.clear()
        return kept, lost

    def adopt(self, path: str | Path) -> int:
        """Queue, in order and ahead of anything appended later, the calls a closed tracker kept in `path`
        (see `keep`); the file is consumed. Returns how many."""
        path = Path(path)
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return 0
        n = 0
        for raw in lines:
            try:
                op, args = json.loads(raw)
            except (json.JSONDecodeError, ValueError, TypeError):
                continue  # a torn last line from a kill while keeping
            self.append((op, tuple(args)))
            n += 1
        os.unlink(path)
        return n

    def _refill(self) -> None:
        if not self.spilled:
            return
        with open(self.spill_path, "rb") as f:
            f.seek(self._read_at)
            while self.spilled and len(self.memory) < self.max_memory:
                line = f.readline()
                if not line:
                    break
                op, args = json.loads(line)
                self.memory.append((op, tuple(args)))
                self.spilled -= 1
            self._read_at = f.tell()
        if not self.spilled:  # all of it is back in memory: start the file afresh
            os.unlink(self.spill_path)
            self._read_at = 0
            self._warned = False
