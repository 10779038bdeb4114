"""pipeline.process_group: a group made with join() is freed by leave(), its gloo worker threads joined before
the interpreter shuts down (a thread still alive there can abort the process after a finished run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a fresh interpreter (pytest's own has long imported torch._dynamo): one gloo rank, one optimizer step (which
# imports torch._dynamo), then leave(); prints the gloo worker threads before and after
SCRIPT = """
import json, sys, tempfile
import torch
import torch.distributed as dist
from pipeline import process_group

store = tempfile.NamedTemporaryFile(prefix="pg-", delete=False).name
kwargs = dict(init_method=f"file://{store}", rank=0, world_size=1)
process_group.join("gloo", **kwargs) if sys.argv[1] == "join" else dist.init_process_group("gloo", **kwargs)
w = torch.nn.Parameter(torch.ones(4))
opt = torch.optim.Adam([w])
t = torch.ones(4)
dist.all_reduce(t)
(w * t).sum().backward()
opt.step()
before = process_group.worker_threads()
process_group.leave()
print(json.dumps({"before": before, "after": process_group.worker_threads()}))
"""


def threads_around_leaving(how: str) -> tuple[dict[str, int], str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, how], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_a_group_made_with_join_leaves_no_gloo_thread_behind():
    threads, stderr = threads_around_leaving("join")
    assert threads == {"before": 2, "after": 0} and "outlived" not in stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_without_join_an_optimizer_step_keeps_the_destroyed_group_and_its_threads_alive():
    # what join() exists for: if a torch release stops keeping the group, this fails and join() can go
    threads, stderr = threads_around_leaving("plain")
    assert threads == {"before": 2, "after": 2}
    assert "2 gloo worker threads outlived destroy_process_group" in stderr  # leave() says so
