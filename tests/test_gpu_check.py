"""bench/gpu_check.py, the one-command proof of the GPU paths, run end to end on CPU in its quick mode."""

import json

from tests.test_bench import run_script


def test_gpu_check_quick_on_cpu_passes_and_reports_every_part(tmp_path):
    parts = "loader,train,resume,evaluation,sampling"  # rollback and ZeRO 0 are proven by test_health / test_ema
    proc = run_script("gpu_check.py", "--device", "cpu", "--quick", "--steps", "2", "--parts", parts,
                      "--threads", "1", "--budget-s", "100000", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"environment": "pass", "shards": "pass", "loader:wds": "pass", "loader:dali-cpu": status["loader:dali-cpu"],
                      "loader:dali-gpu": "skip", "train": "pass", "resume": "pass", "evaluation": "pass",
                      "sampling": "pass"}
    assert status["loader:dali-cpu"] in ("pass", "skip")  # skip where DALI is not installed
    assert report["passed"] and all(p["seconds"] >= 0 for p in report["parts"])
    assert "bit for bit" in next(p["detail"] for p in report["parts"] if p["name"] == "resume")
    assert (tmp_path / "gpu_check_samples.png").stat().st_size > 0
    assert "[gpu_check] PASS:" in proc.stdout
