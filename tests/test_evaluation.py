"""Evaluation in the training loop: FID after checkpoints to a real MLflow server, best checkpoint in the store
and the Model Registry, failures that only warn, cached reference statistics, and the truncation sweep."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import config as C
from pipeline import evaluation
from pipeline.tracking import Tracker
from tests import eval_ranks
from tests.test_metrics_vgg16 import write_tiny_vgg16
from tests.trainer_harness import make_trainer, tiny_config

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

# classifier features on a few real images: an evaluation costs about a second on one CPU thread
FAST_EVAL = {
    "eval.features": "classifier", "eval.num_samples": 60, "eval.batch_size": 30, "eval.reference_images": 300,
    "eval.classifier_epochs": 1, "eval.pr_samples": 60, "eval.standing_stats_passes": 2,
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real labelled images (scikit-learn's digits, 10 classes) as 32 px shards, written in this process
    (workers=0): a few seconds, and no Ray to start for these tests."""
    from data_prep.make_shards import make_shards

    out = tmp_path_factory.mktemp("digits-shards-local")
    manifest = make_shards("digits", str(out), resolution=32, shard_size=300, workers=0, progress=False)
    return str(out), manifest.num_classes


@pytest.fixture()
def shards_copy(digits, tmp_path):
    """The digits shards in a folder of this test's own, so caches written next to the manifest start empty."""
    src, n = digits
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return str(dst), n


def test_evaluation_in_training_logs_fid_marks_best_and_registers_the_model(tmp_path, shards_copy, mlflow_server):
    shards, n = shards_copy
    name = f"biggan-test-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, shards, n, **FAST_EVAL, **{
        "train.steps": 4, "train.checkpoint_every": 2, "eval.every": 2, "eval.register_model": name,
        "eval.truncation_sweep": "0.5,0", "eval.cas_samples": 60, "eval.cas_test_images": 100,
    })
    tracker = Tracker(mlflow_server.uri, "eval-test", f"eval-{uuid.uuid4().hex[:6]}", retry_wait=0.2)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    result = trainer.fit()
    tracker.close()
    assert result["status"] == "finished" and trainer.evaluator.failures == 0

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = tracker.run_id
    history = client.get_metric_history(run_id, "eval/fid")
    assert sorted(m.step for m in history) == [2, 4]
    assert all(math.isfinite(m.value) and m.value >= 0 for m in history)
    logged = client.get_run(run_id).data.metrics
    for key in ("eval/is_mean", "eval/precision_classifier", "eval/recall_classifier", "truncation/0.5/fid",
                "truncation/none/fid"):
        assert key in logged
    cas = client.get_metric_history(run_id, "eval/cas")  # CAS at every evaluation, next to the real baseline
    assert sorted(m.step for m in cas) == [2, 4] and all(0 <= m.value <= 1 for m in cas)
    assert logged["eval/cas_gap"] == pytest.approx(logged["eval/real_accuracy"] - logged["eval/cas"])

    # the best evaluation marks its checkpoint, and its g_ema.pt is a registered model version
    fids = {m.step: m.value for m in history}
    best_step = min(fids, key=fids.get)
    best = trainer.store.labels()["best"]
    assert best["step"] == best_step and best["metric"] == "fid" and best["fid"] == pytest.approx(fids[best_step])
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions and all(v.run_id == run_id for v in versions)
    top = client.get_model_version_by_alias(name, "best")
    assert top.tags["step"] == str(best_step) and float(top.tags["fid"]) == pytest.approx(fids[best_step])
    assert top.source.startswith("models:/m-")  # a pyfunc LoggedModel of the run (pipeline.mlflow_model)
    logged = client.get_logged_model(top.source.removeprefix("models:/"))
    assert logged.tags["checkpoint"] == f"runs:/{run_id}/checkpoints/step-{best_step:08d}/g_ema.pt"
    assert [f.path for f in client.list_artifacts(run_id, f"checkpoints/step-{best_step:08d}")] == [
        f"checkpoints/step-{best_step:08d}/g_ema.pt"
    ]
    # the health monitor's input: the newest FID, handed over once
    assert trainer.evaluator.take_fid() == pytest.approx(fids[4]) and trainer.evaluator.take_fid() is None
    # the sweep's "none" is the final evaluation itself (G at step 4, no truncation), not scored a second time
    assert client.get_run(run_id).data.metrics["truncation/none/fid"] == pytest.approx(fids[4], rel=1e-12)
    # the truncation sweep: a plot and the numbers as artifacts
    artifacts = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert {"eval/truncation_sweep.png", "eval/truncation_sweep.json"} <= artifacts


class ClassBankG(torch.nn.Module):
    """A generator that returns a real image of class (y + shift) % K picked by z: shift 0 is a perfect
    class-conditional G, shift 1 one whose every sample shows the wrong class."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, shift: int = 0):
        super().__init__()
        self.dim_z, self.num_classes, self.shift = 8, num_classes, shift
        self.scale = torch.nn.Parameter(torch.ones(()))  # generate() reads the dtype of G's parameters
        self.bank = [images[labels == k] for k in range(num_classes)]

    def forward(self, z, y):
        out = []
        for zi, yi in zip(z, y.tolist()):
            pool = self.bank[(yi + self.shift) % self.num_classes]
            out.append(pool[int(zi[0].abs() * 1e4) % pool.shape[0]])
        return torch.stack(out) * self.scale


def test_cas_is_near_the_real_accuracy_for_a_class_faithful_g_and_near_zero_for_a_class_swapped_one(tmp_path, digits):
    shards, n = digits
    ecfg = C.EvalConfig(features="classifier", reference_images=300, classifier_epochs=6, batch_size=100,
                        standing_stats_passes=1, cas_samples=300, cas_test_images=200,
                        classifier_precision="fp32")  # what the test expects must not depend on the CPU's bf16 units
    ref = evaluation.ReferenceSet(ecfg, shards, resolution=32, num_classes=n, output_dir=tmp_path / "run")
    held_x, held_y = ref.held_out()
    all_x, all_y = evaluation.real_images(shards, count=500, batch_size=100, resolution=32)
    # the 200 images after the classifier's 300, in the same fixed order: never seen by the real classifier
    assert torch.equal(held_x, all_x[300:]) and torch.equal(held_y, all_y[300:])
    bank_x, bank_y = all_x[:300], all_y[:300]  # G draws from the training part only
    faithful = evaluation.cas(ClassBankG(bank_x, bank_y, n), ref, num_classes=n)
    swapped = evaluation.cas(ClassBankG(bank_x, bank_y, n, shift=1), ref, num_classes=n)
    assert faithful["real_accuracy"] == swapped["real_accuracy"] > 0.5  # chance is 0.1
    assert faithful["cas"] > 0.5 and abs(faithful["cas_gap"]) < 0.2
    assert swapped["cas"] < 0.15 and swapped["cas_gap"] > 0.4  # the labels G was asked for are not what it drew
    tiny = C.EvalConfig(reference_images=2000, cas_test_images=10)
    with pytest.raises(ValueError, match="eval.cas_test_images: no real images are left"):
        evaluation.ReferenceSet(tiny, shards, resolution=32, num_classes=n, output_dir=tmp_path / "r2").held_out()


def test_a_failing_evaluation_warns_and_training_goes_on(tmp_path, digits, caplog):
    shards, n = digits
    missing = tmp_path / "no-such-inception.pt"
    cfg = tiny_config(tmp_path, shards, n, **{
        "train.steps": 4, "train.checkpoint_every": 2, "eval.every": 2, "eval.features": "inception",
        "eval.inception_weights": str(missing), "eval.num_samples": 8, "eval.truncation_sweep": "1.0",
    })
    trainer = make_trainer(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation"):
        result = trainer.fit()
    assert result["status"] == "finished" and result["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.evaluation"]
    assert len(warnings) == 3  # two evaluations and the sweep
    assert all("InceptionWeightsNotFound" in w and str(missing) in w and "training goes on" in w for w in warnings)
    assert trainer.evaluator.last_fid is None and trainer.store.labels()["best"] is None


def test_reference_statistics_are_cached_next_to_the_manifest_and_reused(tmp_path, shards_copy, monkeypatch):
    shards, n = shards_copy
    cfg = tiny_config(tmp_path, shards, n, **FAST_EVAL)

    def reference_set():
        return evaluation.ReferenceSet(cfg.eval, shards, resolution=32, num_classes=n, output_dir=tmp_path / "out")

    first = reference_set().reference()
    assert first.count == 300 and first.features.shape[0] == 60
    cached = sorted(p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(("fid_stats_", "eval_")))
    # eval.classifier_precision: a classifier trained in bf16 says so in its file name (the harness trains in fp32)
    suffix = "_bf16" if reference_set().classifier_bf16 else ""
    assert {f"eval_classifier_32px_300_1ep{suffix}.pt", f"fid_stats_{first.extractor}_32_300.npz"} <= set(cached)

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(evaluation, "build_loader", no_reading)
    again = reference_set().reference()
    assert again.extractor == first.extractor
    assert (again.mu == first.mu).all() and (again.sigma == first.sigma).all()


def test_remote_shards_cache_under_the_output_dir(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation"):
        where = evaluation.eval_cache_dir("s3://bucket/shards", tmp_path / "run")
    assert where == tmp_path / "run" / "eval_cache"
    assert "s3://bucket/shards are remote" in caplog.text and str(where) in caplog.text


def test_eval_every_must_be_a_multiple_of_checkpoint_every():
    cfg = C.RunConfig()
    cfg.train.checkpoint_every, cfg.eval.every = 1000, 1500
    with pytest.raises(C.ConfigError, match="eval.every"):
        C.validate(cfg)
    cfg.eval.every = 2000
    C.validate(cfg)
    cfg.eval.truncation_sweep = "0.5,x"
    with pytest.raises(C.ConfigError, match="eval.truncation_sweep"):
        C.validate(cfg)


def test_every_rank_evaluates_its_share_and_gets_the_one_process_metrics(tmp_path, shards_copy):
    shards, n = shards_copy
    # 61 samples in batches of 25: the two ranks' batches (25+6, 25+5) differ from one process's (25+25+11)
    vgg16 = write_tiny_vgg16(tmp_path / "vgg16.pt")  # NVIDIA's interface; precision/recall in its features too
    cfg = tiny_config(tmp_path, shards, n, **{**FAST_EVAL, "eval.num_samples": 61, "eval.batch_size": 25,
                                              "eval.reference_images": 200, "eval.classifier_epochs": 12,
                                              "eval.every": 2, "train.checkpoint_every": 2,
                                              "eval.truncation_sweep": "0.5", "eval.vgg16_weights": vgg16,
                                              # CAS too: 61 samples in batches of 25, drawn 25 + 36 by the ranks; each trains the classifier
                                              "eval.cas_samples": 61, "eval.cas_test_images": 100})
    from pipeline.trainer import build_models

    torch.manual_seed(0)
    real, _ = evaluation.real_images(shards, count=200, batch_size=50, resolution=32)
    G = eval_ranks.HalfRealG(build_models(cfg)[0], real)  # what both worlds evaluate; the ranks get it pickled
    one = eval_ranks.evaluate(eval_ranks.trainer_stub(cfg, 0, 1, copy.deepcopy(G), tmp_path / "work"))
    assert set(one["latest"]) == {"fid", "is_mean", "is_std", "precision_classifier", "recall_classifier",
                                  "precision_vgg16", "recall_vgg16", "cas", "real_accuracy", "cas_gap"}
    assert 0 <= one["latest"]["cas"] <= 1 and one["latest"]["real_accuracy"] > 0.5  # HalfRealG ignores y: CAS ~chance
    assert one["take"] == [one["fid"], None] and math.isfinite(one["fid"])
    metrics = one["latest"]
    assert metrics["is_mean"] > 1.1 and 0 < metrics["precision_classifier"] and 0 < metrics["recall_classifier"]
    assert 0 < metrics["precision_vgg16"] <= 1 and 0 < metrics["recall_vgg16"] <= 1
    assert (Path(shards) / "pr_features_vgg16_32_200.npz").is_file()  # real VGG16 rows, cached like FID stats

    out = str(tmp_path / "got")
    mp.spawn(eval_ranks.evaluate_on_two_ranks, args=(str(tmp_path / "pg"), cfg, G, out), nprocs=2, join=True)
    ranks = []
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    for got in ranks:
        assert got["latest"].keys() == one["latest"].keys()
        for key, value in one["latest"].items():
            assert got["latest"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert got["fid"] == pytest.approx(one["fid"], rel=1e-6)
        assert got["take"] == [got["fid"], None]  # the health monitor's FID on every rank, once
        assert len(got["sweep"]) == 1 and got["sweep"][0]["fid"] == pytest.approx(one["sweep"][0]["fid"], rel=1e-6)
        # rank 1's broken G: no FID on either rank, and each says which rank failed and why
        fid, last, failures, warnings = got["failed"]
        assert fid is None and last is None and failures == 1
        assert len(warnings) == 1 and "rank 1: RuntimeError: this rank's G is broken" in warnings[0]
    assert ranks[0]["latest"] == ranks[1]["latest"]  # computed on each rank, bit for bit the same


@pytest.mark.slow  # two DeepSpeed workers: about 1.5 minutes on 2 busy cores
def test_a_real_two_worker_run_evaluates_on_both_and_matches_one_process_on_its_checkpoint(tmp_path, shards_copy):
    """Two training workers (DeepSpeed over gloo): both evaluate every checkpoint and hold the same metrics; one
    process scoring the last checkpoint's g_ema.pt gets them too."""
    from pipeline.sample import load_generator

    shards, n = shards_copy
    cfg = tiny_config(tmp_path, shards, n, **{**FAST_EVAL, "eval.num_samples": 41, "eval.batch_size": 16,
                                              "cluster.num_workers": 2, "data.batch_size": 4, "train.steps": 4,
                                              "train.checkpoint_every": 2,
                                              "eval.every": 2})
    out = str(tmp_path / "got")
    mp.spawn(eval_ranks.train_on_two_ranks, args=(str(tmp_path / "pg"), cfg, str(tmp_path / "ckpt"), out),
             nprocs=2, join=True)
    ranks = []
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    assert [r["status"] for r in ranks] == ["finished", "finished"] and [r["failures"] for r in ranks] == [0, 0]
    assert ranks[0]["latest"] == ranks[1]["latest"] and ranks[0]["fid"] == ranks[1]["fid"] == ranks[0]["latest"]["fid"]
    assert ranks[0]["best"]["metric"] == "fid"

    G, _, _ = load_generator(ranks[0]["checkpoint"])  # step 4: the last evaluation's checkpoint
    one = eval_ranks.evaluate(eval_ranks.trainer_stub(cfg, 0, 1, G, tmp_path / "work1"))
    assert one["latest"].keys() == ranks[0]["latest"].keys()
    for key, value in one["latest"].items():
        assert ranks[0]["latest"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_bf16_sampling_is_what_a_bf16_run_evaluates_and_stays_close_to_fp32(tmp_path, digits):
    from pipeline.trainer import build_models

    shards, n = digits
    cfg = tiny_config(tmp_path, shards, n)
    torch.manual_seed(0)
    G = build_models(cfg)[0]
    z, y = torch.randn(16, G.dim_z), torch.arange(16) % n
    fp32 = evaluation.evaluation_copy(G, passes=2, batch_size=16)
    bf16 = evaluation.evaluation_copy(G, passes=2, batch_size=16, bf16=True)
    assert isinstance(bf16, evaluation.Bf16Sampling) and (bf16.dim_z, bf16.num_classes) == (G.dim_z, G.num_classes)
    with torch.no_grad():
        a, b = fp32(z, y), bf16(z, y)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # really computed in bf16
    assert (a - b).abs().max() < 0.1  # and still the same images
    assert not any(p.requires_grad for p in bf16.parameters()) and not bf16.training
    # the evaluator samples in the precision the run trains in
    assert make_trainer(cfg, tmp_path / "fp32").evaluator.bf16 is False
    cfg_bf16 = tiny_config(tmp_path, shards, n, **{"train.precision": "bf16"})
    assert make_trainer(cfg_bf16, tmp_path / "bf16").evaluator.bf16 is True
