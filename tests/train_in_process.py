"""A real trainer in this process, as a script a test can signal: `python tests/train_in_process.py OUT SHARDS N
[--set k=v ...]`. It installs the preemption handlers, registers its pid, resumes the newest checkpoint of OUT
and exits with the launch scripts' codes (0 finished, 3 collapsed, 75 preempted)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import preemption, resume  # noqa: E402
from pipeline.cli import exit_code  # noqa: E402
from tests.trainer_harness import make_trainer, tiny_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("shards")
    p.add_argument("num_classes", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    preemption.install_handlers()
    cfg = tiny_config(args.out, args.shards, args.num_classes,
                      **dict(item.split("=", 1) for item in args.overrides))
    with preemption.Registration("in-process", "trainer"):
        trainer = make_trainer(cfg, args.out)
        found = resume.choose(trainer.store, 0, 1, trainer.device)
        if found is not None:
            trainer.load_checkpoint(found)
            print(f"[resume] from step {found.step}", flush=True)
        result = trainer.fit()
    print(f"[result] {result['status']} {result['step']}", flush=True)
    return exit_code(result["status"])


if __name__ == "__main__":
    sys.exit(main())
