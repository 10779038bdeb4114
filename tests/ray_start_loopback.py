"""Ray's own `ray start` CLI, for a second node on this machine that stays on 127.0.0.1.

Ray keeps every socket on loopback only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, but with that setting its
`ray start --address ...` refuses to join (multi-node is "not supported"); with the setting on, Ray binds and
dials the machine's network address. So this runs the unchanged CLI with loopback kept everywhere and only the
CLI's multi-node guard lifted. Usage: python tests/ray_start_loopback.py start --address=127.0.0.1:PORT ...
"""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray.scripts.scripts as scripts  # noqa: E402
from ray._private import ray_constants  # noqa: E402


class _GuardLifted:
    """ray_constants as the CLI sees it, except for the multi-node guard; address logic elsewhere is untouched."""

    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name):
        return getattr(ray_constants, name)


scripts.ray_constants = _GuardLifted()

if __name__ == "__main__":
    sys.exit(scripts.main())
