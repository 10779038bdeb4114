"""Embedded local Ray (pipeline.ray_local.init_ray) runs with token authentication, with a token of the process's
own in its environment rather than a file in the (shared, possibly read-only) home directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROBE = """
import json, os, pathlib
from pipeline.ray_local import init_ray
import ray
assert init_ray(num_cpus=1)
token = os.environ.get("RAY_AUTH_TOKEN", "")
nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
ray.shutdown()
print(json.dumps({"mode": os.environ.get("RAY_AUTH_MODE"), "token_len": len(token), "nodes": nodes,
                  "token_file": (pathlib.Path.home() / ".ray" / "auth_token").exists()}))
"""


def _probe(tmp_path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run_env = {**base, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **env}
    res = subprocess.run([sys.executable, "-c", PROBE], env=run_env, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_embedded_ray_uses_token_auth_with_a_private_token(tmp_path):
    out = _probe(tmp_path)
    assert out["mode"] == "token" and out["token_len"] == 64
    assert out["nodes"] == ["127.0.0.1"]
    assert not out["token_file"], "init_ray wrote a token into the home directory"
