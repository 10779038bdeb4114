"""``python -m models summary`` prints parameter counts as one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import build_discriminator, build_generator
from models.__main__ import main

ROOT = Path(__file__).resolve().parent.parent



def test_summary_command_prints_the_paper_counts():
    proc = subprocess.run(
        [sys.executable, "-m", "models", "summary", "--arch", "biggan", "--resolution", "128"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    out = json.loads(proc.stdout)
    assert (out["G_params"], out["D_params"]) == (70_433_988, 87_982_370)
    assert out["G_shared_embedding_params"] == 128_000
    assert out["G_config"]["dim_z"] == 120 and out["D_config"]["attention"] == [64]


@pytest.mark.parametrize(("arch", "resolution", "classes", "ch"), [("biggan-deep", 512, 10, 4), ("biggan", 32, 7, 8)])
def test_summary_counts_equal_the_built_models(capsys, arch, resolution, classes, ch):
    argv = ["summary", "--arch", arch, "--resolution", str(resolution), "--num-classes", str(classes), "--ch", str(ch)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    G = build_generator(arch, resolution, classes, ch=ch)
    D = build_discriminator(arch, resolution, classes, ch=ch)
    assert out["G_params"] == sum(p.numel() for p in G.parameters())
    assert out["D_params"] == sum(p.numel() for p in D.parameters())
    assert out["G_config"]["ch"] == ch and out["num_classes"] == classes


def test_summary_rejects_bad_values_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["summary", "--arch", "biggan", "--resolution", "100"])
    assert exc.value.code == 2
    assert "resolution must be one of" in capsys.readouterr().err
