"""The WGAN-GP baseline on the demo's data and embedded default: `python launch/wgan_gp_fmnist.py [--set ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `python launch/x.py` finds the project

from launch.demo import run  # noqa: E402
from pipeline.cli import build_parser as _build_parser  # noqa: E402

PRESET = "wgan-gp-fmnist"


def build_parser():
    return _build_parser(PRESET)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], PRESET))
