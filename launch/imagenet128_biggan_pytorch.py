"""Train the imagenet128-biggan-pytorch preset. `python launch/imagenet128_biggan_pytorch.py --help` lists every option."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `python launch/x.py` finds the project

from pipeline.cli import build_parser as _build_parser  # noqa: E402
from pipeline.cli import main  # noqa: E402

PRESET = "imagenet128-biggan-pytorch"


def build_parser():
    return _build_parser(PRESET)


if __name__ == "__main__":
    sys.exit(main(PRESET))
