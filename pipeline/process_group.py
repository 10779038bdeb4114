"""Joining and leaving a torch.distributed process group so that the process can still exit cleanly.

    from pipeline import process_group
    process_group.join("gloo", init_method=f"file://{path}", rank=rank, world_size=world_size)
    ...                                    # collectives
    process_group.leave()                  # the group's threads are gone when this returns

Why not dist.init_process_group / destroy_process_group alone: a gloo worker thread releases each finished
collective's tensors itself, and releasing a tensor Python knows of takes the GIL. A group that outlives
destroy_process_group keeps its worker threads into interpreter shutdown, where a thread that takes the GIL is
ended by force, which aborts the process ("terminate called without an active exception", SIGABRT, exit -6) after
work that had succeeded. torch 2.13's torch._dynamo, when first imported while a group exists (an optimizer's first
step imports it), keeps a reference to that group, so destroy_process_group no longer frees it. Imported before the
group is made, it holds none: destroy_process_group then frees the group, whose destructor joins its threads
while Python is fully alive. tests/test_process_group.py shows both.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)


def join(backend: str, **kwargs: Any) -> None:
    """dist.init_process_group(backend, **kwargs), after what must come before it (see the module docstring)."""
    import torch._dynamo  # noqa: F401 - imported for its side effect: before the group exists, not after

    dist.init_process_group(backend, **kwargs)


def leave() -> None:
    """Destroy every process group of this process (a no-op if there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if left := worker_threads():
        log.warning("%d gloo worker threads outlived destroy_process_group (something still holds the group; was "
                    "it made with process_group.join?): this process may abort at exit", left)


def worker_threads() -> int:
    """Live gloo worker threads of this process (Linux: their names in /proc; 0 elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return 0
    count = 0
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # the thread ended meanwhile
            continue
    return count
