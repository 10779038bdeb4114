"""The benchmark harness: throughput.py end to end on a tiny CPU config, its FLOP counting, and scaling.py's
all-reduce model and measurement (two gloo processes on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import scaling, throughput
from pipeline.performance import fast_bf16
from tests.conftest import ROOT

TINY = ["--device", "cpu", "--arch", "biggan", "--ch", "4", "--resolution", "32", "--batch", "4",
        "--warmup", "1", "--iters", "2", "--images", "64", "--threads", "2"]


def run_script(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_throughput(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    proc = run_script("throughput.py", *TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_throughput_runs_trainer_and_bare_step_and_reports_every_field(tiny_throughput):
    result, stdout = tiny_throughput
    assert result["device_type"] == "cpu" and result["peak_mem_kind"] == "rss_high_water_mark"
    (run,) = result["runs"]
    a, b = run["a"], run["b"]
    for side in (a, b):
        assert side["images_per_s"] > 0 and side["iter_s"] > 0 and side["peak_mem"] > 0
        assert side["images_per_s"] == pytest.approx(run["d_steps"] * run["batch"] / side["iter_s"])
        assert side["mfu"] is None  # no peak known for a CPU unless --peak-tflops is given
    assert run["ratio"] == pytest.approx(a["images_per_s"] / b["images_per_s"])
    assert 0 <= a["data_wait"] < a["iter_s_mean"]
    # train.precision=auto: what pipeline/performance.py chose for this CPU, and said so
    bf16 = a["speed"]["speed.precision"] == "bf16"
    assert a["dtype"] == ("bfloat16" if bf16 else "float32") and a["loader_backend"] in ("dali-cpu", "wds")
    assert bf16 == fast_bf16(torch.device("cpu")) and a["speed"]["speed.precision.reason"].startswith("auto")
    # the trainer and the bare step do the same math on the same model
    assert run["flops_per_iter"] > 0 and run["flops_per_iter_a"] == run["flops_per_iter"]
    params = run["params"]
    assert run["grad_bytes_per_iter"] == (2 * params["D"] + params["G"]) * (2 if bf16 else 4)
    assert run["loader"]["images_per_s"] > 0
    assert run["loader"]["ratio_to_a"] == pytest.approx(run["loader"]["images_per_s"] / a["images_per_s"])
    assert "ratio (a)/(b)" in stdout and "MFU" in stdout


def test_loader_only_compares_with_the_trainer_json(tiny_throughput, tmp_path):
    result, _ = tiny_throughput
    trainer_json = tmp_path / "trainer.json"
    trainer_json.write_text(json.dumps(result))
    out = tmp_path / "loader.json"
    proc = run_script("throughput.py", "--loader-only", "--device", "cpu", "--resolution", "32", "--batch", "4",
                      "--images", "64", "--trainer-json", str(trainer_json), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lo = json.loads(out.read_text())["loader"]
    assert lo["images_per_s"] > 0 and lo["resolution"] == 32
    expected = lo["images_per_s"] / result["runs"][0]["a"]["images_per_s"]
    assert lo["vs_trainer"]["biggan"]["ratio"] == pytest.approx(expected)


def test_flop_count_of_a_linear_layer_matches_the_analytic_count():
    batch, fan_in, fan_out = 8, 64, 32
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in, requires_grad=True)
    matmul = 2 * batch * fan_in * fan_out  # multiply-adds x 2
    assert throughput.count_flops(lambda: layer(x)) == matmul
    # backward: one matmul for the input's gradient, one for the weight's
    assert throughput.count_flops(lambda: layer(x).sum().backward()) == 3 * matmul


def test_ring_allreduce_model_gives_the_hand_computed_times():
    gb, link_100g = 1e9, 100e9 / 8  # 1 GB of gradients; 100 Gb/s = 12.5 GB/s
    # 4 nodes: 2 x 3/4 x 1 GB / 12.5 GB/s = 0.12 s
    assert scaling.ring_allreduce_s(gb, 4, link_100g) == pytest.approx(0.12)
    assert scaling.ring_allreduce_s(gb, 4, link_100g, latency_s=1e-5) == pytest.approx(0.12 + 6 * 1e-5)
    assert scaling.ring_allreduce_s(gb, 1, link_100g) == 0.0
    assert scaling.gbps_to_bytes(100) == link_100g
    # 4 nodes x 8 GPUs at 100 GB/s inside a node: + 2 x 7/8 x 1 GB / 100 GB/s = 0.0175 s
    t = scaling.cluster_allreduce_s(gb, 4, 8, link_100g, 100e9)
    assert t == pytest.approx(0.1375)
    assert scaling.efficiency(1.0, t) == pytest.approx(1 / 1.1375)
    assert scaling.efficiency(1.0, t, overlap=True) == 1.0
    rows = scaling.scaling_rows(1.0, gb, [1, 4], [100.0], 8, 100e9, latency_s=1e-5, collectives=3)
    assert [r["nodes"] for r in rows] == [1, 4]
    assert rows[0]["inter_s"] == 0.0 and rows[0]["allreduce_s"] == pytest.approx(0.0175)
    assert rows[1]["inter_s"] == pytest.approx(0.12 + 3 * 6 * 1e-5)
    assert rows[1]["compute_s_for_90pct"] == pytest.approx(9 * rows[1]["allreduce_s"])
    measured = [{"bytes": 2**20, "busbw": 1.0}, {"bytes": 2**26, "busbw": 2.0}, {"bytes": 2**28, "busbw": 3.0}]
    assert scaling.nearest_row(measured, 1e8)["bytes"] == 2**26  # 100 MB is nearer 64 MiB than 256 MiB


def test_gloo_allreduce_between_two_local_processes_is_measured():
    m = scaling.measure_allreduce(nproc=2, backend="gloo", sizes_mb=(0.25, 1), iters=2)
    assert m["backend"] == "gloo" and m["nproc"] == 2
    assert [r["bytes"] for r in m["rows"]] == [2**18, 2**20]
    for r in m["rows"]:
        assert r["seconds"] > 0 and math.isfinite(r["busbw"]) and r["busbw"] == pytest.approx(r["algbw"])
    assert m["busbw"] == m["rows"][-1]["busbw"]


def test_scaling_reads_compute_time_and_gradient_bytes_from_the_throughput_json(tiny_throughput, tmp_path, capsys):
    result, _ = tiny_throughput
    src, out = tmp_path / "throughput.json", tmp_path / "scaling.json"
    src.write_text(json.dumps(result))
    assert scaling.main(["--throughput-json", str(src), "--no-measure", "--intra-GBps", "10",
                         "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    run = result["runs"][0]
    assert data["workload"]["compute_s"] == run["a"]["iter_s"]
    assert data["workload"]["grad_bytes"] == run["grad_bytes_per_iter"]
    assert len(data["rows"]) == len(scaling.NODES) * len(scaling.LINKS_GBPS)
    assert all(0 < r["efficiency"] <= 1 for r in data["rows"])
    assert "eff overlap" in capsys.readouterr().out


def test_paper_model_gradient_bytes_are_counted_on_the_meta_device():
    params = scaling.model_params("biggan")
    # the published BigGAN-128 sizes (ch 96): 70.4M G and 88.0M D parameters
    assert params["G"] == pytest.approx(70.4e6, rel=0.01) and params["D"] == pytest.approx(88.0e6, rel=0.01)


def test_detector_dates_a_lasting_failure_and_judges_the_rollback():
    from bench.detector import Run, judge

    def snaps(fids, segment=0, start=5):
        return [{"step": start + 5 * i, "segment": segment, "fid": f, "fidelity": 0.3, "finite": True}
                for i, f in enumerate(fids)]

    # a one-snapshot spike is not a failure; a jump that lasts is, from its first snapshot
    run = Run("x", 0, 100, status="finished", snapshots=snaps([200, 90, 60, 55, 50, 130, 50, 50, 150, 160, 170, 180, 190, 200]))
    judge(run, nc=10, every=5)
    assert run.onset == 45 and run.verdict["false_alarm"] is False  # not 30: the spike there did not last
    # caught at the next check, restored to a step before the onset, and back to its best after the rollback
    run = Run("x", 0, 100, status="finished", alarms=[{"step": 45, "reason": "r", "onset": 40}], rollbacks=[(45, 25)],
              snapshots=snaps([200, 90, 60, 55, 50, 50, 50, 150, 160]) + snaps([52, 51], segment=1, start=30))
    judge(run, nc=10, every=5)
    assert run.onset == 40  # cut short by the rollback: failed up to it
    assert run.verdict == {**run.verdict, "delay_checks": 1, "restored_before_onset": True, "recovered": True,
                           "false_alarm": False}
    # an alarm on a run that never failed is a false alarm
    run = Run("x", 0, 60, status="finished", alarms=[{"step": 30, "reason": "r", "onset": 25}],
              snapshots=snaps([200, 90, 60, 55, 50, 50, 50, 52, 51, 50, 50]))
    judge(run, nc=10, every=5)
    assert run.onset is None and run.verdict["false_alarm"] is True
    # a D that gives every input the same output is a failure whatever G's samples score (G learns nothing more)
    run = Run("x", 0, 100, status="finished", snapshots=snaps([200, 90, 60, 55, 50, 50, 50, 50, 50, 50, 50, 50]))
    for s in run.snapshots:
        s["d_spread"] = 0.8 if s["step"] < 30 else 2e-4
    judge(run, nc=10, every=5)
    assert run.onset == 30
    assert run.verdict_onset_by == "D dead"
    # a D that ranks generated images above real ones pushes G the wrong way: failed before G's samples show it
    for s in run.snapshots:
        s["d_spread"], s["d_auc"] = 0.8, (0.85 if s["step"] < 35 else 0.05)
    judge(run, nc=10, every=5)
    assert (run.onset, run.verdict_onset_by) == (35, "D inverted")


def test_cas_classifier_trains_on_samples_and_on_real_images_and_reports_the_gap(tmp_path, digits_shards):
    """bench/cas_classifier.py on a random G and real digits: one JSON line per variant, the real classifier's
    accuracy well above chance, an untrained G's samples near chance, and the gap between them."""
    from pipeline import sample
    from tests.test_sample import tiny_config

    shards, num_classes = digits_shards
    cfg = tiny_config()
    cfg.model.num_classes = num_classes
    torch.manual_seed(0)
    G = sample.build_generator(cfg, num_classes)
    ckpt = tmp_path / "g_ema.pt"
    torch.save({"g_ema_state": G.state_dict(), "config": cfg.to_dict(),
                "class_names": [str(i) for i in range(num_classes)], "step": 1}, ckpt)
    proc = run_script("cas_classifier.py", str(ckpt), "--data", shards, "--samples", "600", "--test", "300",
                      "--variant", "src=real,epochs=4", "--variant", "epochs=2,max_shift=0", "--per-class")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    real, fake = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    assert real["src"] == "real" and real["accuracy"] > 0.5
    assert fake["max_shift"] == 0 and fake["accuracy"] < 0.35
    names = [str(i) for i in range(num_classes)]
    # --per-class: the held-out accuracy of every class, the real classifier's on G's samples (an untrained G's
    # are noise: near chance on average), and the classes each is mistaken for
    assert sorted(real["per_class"]) == sorted(fake["per_class"]) == sorted(real["fidelity"]) == sorted(names)
    assert sum(real["per_class"].values()) / num_classes > 0.5 and "fidelity" not in fake
    assert sum(real["fidelity"].values()) / num_classes < 0.5
    assert all(k not in fake["confused_with"][k] and len(fake["confused_with"][k]) <= 2 for k in names)
    assert fake["gap_points"] == pytest.approx(100 * (real["accuracy"] - fake["accuracy"]), abs=0.06)
    bad = run_script("cas_classifier.py", str(ckpt), "--data", shards, "--variant", "src=both")
    assert bad.returncode == 2 and "src must be fake or real" in bad.stderr
