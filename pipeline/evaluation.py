"""Evaluation inside the training loop: FID and friends of EMA G after a checkpoint, best-checkpoint bookkeeping,
and a truncation sweep at the end of training.

    trainer.evaluator = Evaluator(trainer)             # in Trainer.__init__
    trainer.evaluator.after_checkpoint(step, info)     # in fit(), after each committed checkpoint
    trainer.evaluator.finish()                         # at the end of fit(): truncation sweep

Every `eval.every` G steps (and at the last step) every rank evaluates a copy of EMA G with standing statistics:
`metrics.evaluate_generator` in the features of `eval.features` against reference statistics of the real
images, each rank generating and embedding its share of the samples, the statistics all-reduced, the metrics
computed from them on every rank (metrics/evaluate.py says what each metric exchanges). Rank 0 logs them to
MLflow as `eval/fid`, `eval/is_mean`, `eval/is_std`, `eval/precision_<space>`, `eval/recall_<space>` (<space>:
the features precision/recall ran in, `inception` or `classifier`, plus `vgg16` when `eval.vgg16_weights` names
NVIDIA's VGG16; `eval/seconds`: how long it took). Every rank keeps its FID in `last_fid` for the health
monitor's next check (`take_fid()`). A new best FID marks the checkpoint best in the store, logs
its `g_ema.pt` as the run artifact `checkpoints/step-XXXXXXXX/g_ema.pt` and registers that as a new version
of the MLflow model `eval.register_model` (tags: fid, config, classes; alias `best`).

The real side (`ReferenceSet`) is computed once per shard set and cached next to the manifest: reference
statistics (`fid_stats_<extractor>_<res>_<count>.npz`) from un-augmented images (no flips, centre crops) and,
for `eval.features=classifier`, the dataset classifier (`eval_classifier_<res>px_<count>_<epochs>ep.pt`).
Shards behind a URL (s3://...) or in a read-only folder get the cache under `<output_dir>/eval_cache`
instead, which is logged. Rank 0 builds the real side (at the first evaluation: it alone reads the shards and
trains the classifier; the others wait that once) and sends it to the other ranks; the Inception and VGG16
files are loaded on each rank, so they must exist on every node.

Evaluation never stops training: any exception on any rank becomes a warning with its reason on every rank
(and the FID of that evaluation is unknown everywhere); the global RNG state is restored afterwards, so
evaluating does not change what training does next.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import metrics
from pipeline.checkpoint import CheckpointInfo, rng_state, set_rng_state
from pipeline.config import EvalConfig, parse_thresholds
from pipeline.data import build_loader, read_manifest
from pipeline.metrics.classifier import MAX_INPUT_SIZE, classifier_from_payload, classifier_payload

if TYPE_CHECKING:
    from pipeline.trainer import Trainer

log = logging.getLogger(__name__)

SEED = 0  # the same latents at every evaluation: FID differences between steps are G's, not the draw's
CACHE_DIR_NAME = "eval_cache"
CHECKPOINT_FILE = "g_ema.pt"
REGISTER_WAIT_S = 600.0  # how long the background registration waits for the artifact upload


# -- the real side --------------------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def eval_cache_dir(shards: str, output_dir: str | os.PathLike) -> Path:
    """The shard folder itself when it is local and writable, else <output_dir>/eval_cache (logged)."""
    if not _is_url(shards):
        folder = Path(shards.removeprefix("file://"))
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder
        reason = f"the shard folder {folder} is not writable"
    else:
        reason = f"the shards at {shards} are remote"
    cache = Path(output_dir) / CACHE_DIR_NAME
    log.info("evaluation: %s; caching reference statistics and the classifier in %s", reason, cache)
    return cache


def real_batches(shards: str, *, count: int, batch_size: int, resolution: int,
                 num_threads: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """The first `count` images of the shard set in one fixed order, un-augmented: (images in [-1, 1], labels).

    Close the iterator (contextlib.closing) if you stop early; that releases the loader.
    """
    with build_loader(shards, batch_size=batch_size, backend="wds", seed=SEED, resolution=resolution,
                      random_crop=False, flip=False, drop_last=False, num_threads=num_threads) as loader:
        seen = 0
        while seen < count:
            images, labels = next(loader)
            take = min(count - seen, images.shape[0])
            seen += take
            yield images[:take], labels[:take]


def real_images(shards: str, *, count: int, batch_size: int, resolution: int,
                max_size: int = MAX_INPUT_SIZE) -> tuple[Tensor, Tensor]:
    """`real_batches` gathered in memory (CPU), area-downsampled to at most max_size px (what the classifier sees)."""
    images, labels = [], []
    with contextlib.closing(real_batches(shards, count=count, batch_size=batch_size, resolution=resolution)) as it:
        for x, y in it:
            if x.shape[-1] > max_size:
                x = F.interpolate(x, size=(max_size, max_size), mode="area")
            images.append(x.cpu())
            labels.append(y.cpu())
    return torch.cat(images), torch.cat(labels)


class ReferenceSet:
    """The real side of every evaluation of one shard set: the feature extractor and the reference statistics,
    built on first use and cached on disk (see the module docstring)."""

    def __init__(self, ecfg: EvalConfig, shards: str, *, resolution: int, num_classes: int,
                 output_dir: str | os.PathLike, device: torch.device | str = "cpu"):
        self.ecfg, self.shards, self.resolution, self.num_classes = ecfg, shards, resolution, num_classes
        self.output_dir, self.device = Path(output_dir), torch.device(device)
        self._cache_dir: Path | None = None
        self._count: int | None = None
        self._extractor: metrics.FeatureExtractor | None = None
        self._classifier: metrics.SmallClassifier | None = None
        self._reference: metrics.ReferenceStats | None = None
        self._vgg: tuple[metrics.FeatureExtractor, metrics.ReferenceStats] | None = None
        self._images: tuple[Tensor, Tensor] | None = None  # kept only between training the classifier and the stats
        self._shared = False  # prepare() done: every rank of the group holds the real side
        self._held_out: tuple[Tensor, Tensor] | None = None  # CAS test images (held_out)
        self._real_accuracy: float | None = None

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            self._cache_dir = eval_cache_dir(self.shards, self.output_dir)
        return self._cache_dir

    @property
    def count(self) -> int:
        """Real images used: eval.reference_images (0 = eval.num_samples), at most the whole shard set."""
        if self._count is None:
            wanted = self.ecfg.reference_images or self.ecfg.num_samples
            self._count = min(wanted, int(read_manifest(self.shards)["num_samples"]))
        return self._count

    @property
    def classifier_bf16(self) -> bool:
        """Train the classifiers (dataset and CAS) in bf16: eval.classifier_precision, auto as train.precision=auto."""
        choice = self.ecfg.classifier_precision
        if choice == "auto":
            from pipeline.performance import fast_bf16  # noqa: PLC0415

            return fast_bf16(self.device)
        return choice == "bf16"

    def classifier_train_kwargs(self) -> dict:
        return {"epochs": self.ecfg.classifier_epochs, "bf16": self.classifier_bf16}

    def classifier(self) -> metrics.SmallClassifier:
        """The dataset classifier (trained on the first `count` real images once, then loaded from the cache)."""
        if self._classifier is None:
            suffix = "_bf16" if self.classifier_bf16 else ""
            path = (self.cache_dir /
                    f"eval_classifier_{self.resolution}px_{self.count}_{self.ecfg.classifier_epochs}ep{suffix}.pt")

            def data() -> tuple[Tensor, Tensor]:
                self._images = real_images(self.shards, count=self.count, batch_size=self.ecfg.batch_size,
                                           resolution=self.resolution)
                return self._images

            self._classifier = metrics.load_or_train_classifier(
                path, data, self.num_classes, device=self.device, seed=SEED, **self.classifier_train_kwargs(),
            )
        return self._classifier

    def extractor(self) -> metrics.FeatureExtractor:
        if self._extractor is None:
            if self.ecfg.features == "classifier":
                self._extractor = metrics.ClassifierExtractor(self.classifier(), batch_size=max(self.ecfg.batch_size, 256))
            else:
                self._extractor = metrics.build_extractor(
                    "inception", weights=self.ecfg.inception_weights, device=self.device, batch_size=self.ecfg.batch_size,
                )
        return self._extractor

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._images is not None:  # just read for the classifier: no second pass over the shards
            x, y = self._images
            bs = self.ecfg.batch_size
            return ((x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs))
        return real_batches(self.shards, count=self.count, batch_size=self.ecfg.batch_size, resolution=self.resolution)

    def reference(self) -> metrics.ReferenceStats:
        if self._reference is None:
            extractor = self.extractor()
            path = metrics.reference_stats_path(self.cache_dir, extractor, self.resolution, self.count)
            with contextlib.closing(self._batches()) as batches:
                self._reference = metrics.reference_stats(batches, extractor, path, max_images=self.count,
                                                          keep_features=self.ecfg.pr_samples, seed=SEED)
            self._images = None
        return self._reference

    def vgg16_extractor(self) -> metrics.FeatureExtractor | None:
        """NVIDIA's VGG16 when eval.vgg16_weights (or $BIGGAN_VGG16_WEIGHTS) names it, else None."""
        path = metrics.vgg16_weights_path(self.ecfg.vgg16_weights)
        if path is None:
            return None
        return metrics.VGG16Extractor.from_weights(path, device=self.device, batch_size=self.ecfg.batch_size)

    def vgg16(self) -> tuple[metrics.FeatureExtractor, metrics.ReferenceStats] | None:
        """(VGG16, real VGG16 features of all `count` reference images) for precision/recall as NVIDIA's pr50k3
        computes it; None without weights."""
        if self._vgg is None:
            vgg = self.vgg16_extractor()
            if vgg is None:
                return None
            path = metrics.reference_stats_path(self.cache_dir, vgg, self.resolution, self.count, prefix="pr_features")
            with contextlib.closing(self._batches()) as batches:
                rows = metrics.reference_stats(batches, vgg, path, max_images=self.count,
                                               keep_features=self.count, seed=SEED, moments=False)
            self._vgg = (vgg, rows)
        return self._vgg

    def prepare(self, group: metrics.Collective = metrics.LOCAL) -> None:
        """Every rank calls this: rank 0 builds (or loads) the real side and sends it to the others."""
        if self._shared:
            return

        def build() -> dict:
            extractor = self.extractor()
            vgg = self.vgg16()
            return {
                "classifier": classifier_payload(self._classifier) if self._classifier is not None else None,
                "reference": self.reference(),
                "vgg16": vgg[1] if vgg is not None else None,
                "extractor": extractor.name,
            }

        payload = group.on_rank0(build)  # a classifier trained here uses the node's idle cores
        error = None
        if group.rank != 0:
            try:
                self._adopt(payload)
            except Exception as err:  # noqa: BLE001
                error = err
        group.raise_if_failed(error)
        self._shared = True

    def _adopt(self, payload: dict) -> None:
        """Another rank: take rank 0's real side; the Inception / VGG16 networks come from this node's files."""
        if payload["classifier"] is not None:
            model = classifier_from_payload(payload["classifier"], self.device, source="rank 0's classifier")
            self._classifier = model
        self._reference = payload["reference"]
        if self.extractor().name != payload["extractor"]:
            raise ValueError(f"this rank's extractor is {self.extractor().name!r}, rank 0's {payload['extractor']!r}")
        if payload["vgg16"] is not None:
            vgg = self.vgg16_extractor()
            if vgg is None:
                raise metrics.VGG16WeightsNotFound("rank 0 has VGG16 weights, this rank has none configured "
                                                   "(eval.vgg16_weights / $BIGGAN_VGG16_WEIGHTS)")
            self._vgg = (vgg, payload["vgg16"])

    def held_out(self) -> tuple[Tensor, Tensor]:
        """eval.cas_test_images real images that come after the `count` reference images in the fixed order: never
        seen by the dataset classifier, so CAS and the real classifier are tested on the same unseen images."""
        if self._held_out is None:
            total = int(read_manifest(self.shards)["num_samples"])
            n = min(self.ecfg.cas_test_images, total - self.count)
            if n <= 0:
                raise ValueError(f"eval.cas_test_images: no real images are left for CAS after the {self.count} "
                                 f"reference images of {total}; lower eval.reference_images")
            x, y = real_images(self.shards, count=self.count + n, batch_size=self.ecfg.batch_size,
                               resolution=self.resolution)
            self._held_out = (x[self.count:], y[self.count:])
        return self._held_out

    def real_accuracy(self) -> float:
        """The dataset classifier's accuracy on the held-out images: what CAS is measured against."""
        if self._real_accuracy is None:
            self._real_accuracy = metrics.accuracy(self.classifier(), *self.held_out())
        return self._real_accuracy

    def pr_spaces(self) -> list[tuple[metrics.FeatureExtractor, metrics.ReferenceStats]]:
        """Feature spaces for precision/recall besides eval.features (VGG16, once prepared)."""
        return [self._vgg] if self._vgg is not None else []


# -- the generator side ---------------------------------------------------------------------------------------
class Bf16Sampling(nn.Module):
    """G run under bf16 autocast, as it trained under train.precision=bf16; images come back float32. On a CPU
    with AMX-BF16 the demo's G samples 2.6x faster so (0.76 s against 1.98 s for 250 images on one core)."""

    def __init__(self, G: nn.Module, device_type: str):
        super().__init__()
        self.G, self.device_type = G, device_type
        self.dim_z, self.num_classes = G.dim_z, G.num_classes

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.G(z, y).float()


def evaluation_copy(G: nn.Module, *, passes: int, batch_size: int, truncation: float = 0.0,
                    device: torch.device | str = "cpu", bf16: bool = False) -> nn.Module:
    """A copy of G in eval mode whose batch norms hold standing statistics at this truncation (passes 0: G's own),
    sampled under bf16 autocast if `bf16` (standing statistics too: the forward they describe)."""
    G = copy.deepcopy(G).eval().requires_grad_(False)
    if bf16:
        device_type = torch.device(device).type
        if device_type == "cpu":
            # bf16 convolutions on a CPU run faster in NHWC: the demo's G samples 2x faster on one core of the AMX
            # Xeon (167 against 332 ms for 250 images in batches of 50; bench/RESULTS.md, "Session 22")
            G = G.to(memory_format=torch.channels_last)
        G = Bf16Sampling(G, device_type).eval()
    if passes > 0:
        from models.sampling import standing_stats

        gen = torch.Generator(device=device).manual_seed(SEED)
        standing_stats(G, passes, batch_size, truncation=truncation or None, generator=gen, device=device)
    return G


def shared_copy(G: nn.Module, reference: ReferenceSet, *, truncation: float = 0.0, device: torch.device | str = "cpu",
                standing_stats: bool = True, group: metrics.Collective = metrics.LOCAL,
                bf16: bool = False) -> nn.Module:
    """evaluation_copy on every rank of `group` (each calls it), with eval.standing_stats_passes: the same copy on
    every rank (standing statistics from the same seeded draws); a failure on any rank raises on all."""
    ecfg = reference.ecfg
    G_eval, error = None, None
    try:
        G_eval = evaluation_copy(G, passes=ecfg.standing_stats_passes if standing_stats else 0,
                                 batch_size=ecfg.batch_size, truncation=truncation, device=device, bf16=bf16)
    except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
        error = err
    group.raise_if_failed(error)
    return G_eval


def score(G: nn.Module, reference: ReferenceSet, *, num_classes: int, truncation: float = 0.0,
          device: torch.device | str = "cpu", standing_stats: bool = True,
          group: metrics.Collective = metrics.LOCAL, bf16: bool = False,
          G_eval: nn.Module | None = None) -> dict[str, float]:
    """evaluate_generator on a standing-statistics copy of G (sampled in bf16 if `bf16`; `G_eval`: one that
    `shared_copy` made at this truncation), on every rank of `group` (each calls it): {'fid', 'is_mean', 'is_std',
    'precision_<space>', 'recall_<space>'}, the same on every rank."""
    ecfg = reference.ecfg
    reference.prepare(group)
    if G_eval is None:
        G_eval = shared_copy(G, reference, truncation=truncation, device=device, standing_stats=standing_stats,
                             group=group, bf16=bf16)
    return metrics.evaluate_generator(
        G_eval, num_classes=num_classes, dim_z=G_eval.dim_z, num_samples=ecfg.num_samples,
        batch_size=ecfg.batch_size, extractor=reference.extractor(), ref_stats=reference.reference(),
        truncation=truncation, device=device, seed=SEED, pr_samples=ecfg.pr_samples,
        pr_spaces=reference.pr_spaces(), group=group,
    )


def cas(G: nn.Module, reference: ReferenceSet, *, num_classes: int, device: torch.device | str = "cpu",
        bf16: bool = False, group: metrics.Collective = metrics.LOCAL,
        G_eval: nn.Module | None = None) -> dict[str, float]:
    """{'cas', 'real_accuracy', 'cas_gap'}: a classifier like the dataset one (same epochs) trained on
    eval.cas_samples class-balanced samples of a standing-statistics copy of G (`G_eval`: one that `shared_copy`
    made without truncation), and the dataset classifier, both tested on the held-out real images. With a group
    (every rank calls it) the ranks share the sampling; every rank gets the same numbers."""
    ecfg = reference.ecfg
    if G_eval is None:
        G_eval = shared_copy(G, reference, device=device, group=group, bf16=bf16)
    test_images, test_labels = reference.held_out()
    out = metrics.classification_accuracy_score(
        G_eval, num_classes=num_classes, dim_z=G_eval.dim_z, test_images=test_images, test_labels=test_labels,
        num_samples=ecfg.cas_samples, batch_size=ecfg.batch_size, device=device, seed=SEED,
        train_kwargs=reference.classifier_train_kwargs(), group=group,
    )
    out["real_accuracy"] = reference.real_accuracy()
    out["cas_gap"] = out["real_accuracy"] - out["cas"]
    return out


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Evaluation seeds torch (classifier training) and draws numbers: keep training's random stream intact."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# -- in the training loop -------------------------------------------------------------------------------------
class Evaluator:
    """Periodic evaluation for one Trainer (every rank has one and does its share; rank 0 logs and registers)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg.eval
        self.last_fid: float | None = None  # newest FID not yet handed to the health monitor (take_fid)
        self.latest: dict[str, float] = {}  # metrics of the newest evaluation (the same on every rank)
        self.failures = 0
        self._reference: ReferenceSet | None = None
        self._pool: ThreadPoolExecutor | None = None  # rank 0: artifact upload waits and model registration
        self._pending: list[Future] = []
        self._scored: tuple[int, float, dict[str, float]] | None = None  # (step, truncation, score) of the newest

    # -- what the trainer calls --------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step == self.trainer.cfg.train.steps)

    def take_fid(self) -> float | None:
        """The newest FID, once: the health monitor's "fid" signal at its next check."""
        fid, self.last_fid = self.last_fid, None
        return fid

    def after_checkpoint(self, step: int, info: CheckpointInfo | None) -> float | None:
        """Evaluate EMA G if this step is due (every rank calls it); every rank gets the same FID (None when the
        evaluation failed on any rank)."""
        if not self.due(step):
            return None
        t = self.trainer
        result: dict[str, float] | None = None
        try:
            with _preserved_rng():
                result = self._score(step)
        except Exception as err:  # noqa: BLE001 - evaluation must never stop training
            self._warn(f"evaluation at step {step} failed", err)
        if result is not None and t.rank == 0:
            try:
                self._record(step, info, result)
            except Exception as err:  # noqa: BLE001
                self._warn(f"recording the evaluation at step {step} failed", err)
        fid = result["fid"] if result is not None else math.nan
        self.last_fid = fid if math.isfinite(fid) else None
        return self.last_fid

    def finish(self) -> list[dict[str, float]]:
        """End of training (every rank calls it): the truncation sweep (eval.truncation_sweep) on every rank if
        every rank finished; then rank 0 waits for registrations."""
        results: list[dict[str, float]] = []
        t = self.trainer
        thresholds = parse_thresholds(self.cfg.truncation_sweep)
        if thresholds and self.group.all_true(t.status == "finished"):
            try:
                with _preserved_rng():
                    results = self._sweep(thresholds)
            except Exception as err:  # noqa: BLE001
                self._warn("truncation sweep failed", err)
        elif thresholds and t.rank == 0:
            log.info("truncation sweep skipped: training ended %s", t.status)
        if t.rank == 0:
            self.wait()
        return results

    def wait(self, timeout: float = REGISTER_WAIT_S) -> None:
        """Wait for background artifact/registry work (rank 0)."""
        deadline = time.monotonic() + timeout
        for fut in self._pending:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as err:  # noqa: BLE001
                self._warn("registering the best checkpoint failed", err)
        self._pending = [f for f in self._pending if not f.done()]

    # -- every rank ----------------------------------------------------------------------------------------------
    @property
    def bf16(self) -> bool:
        """Sample in bf16 where training runs in it (train.precision)."""
        return self.trainer.dtype == torch.bfloat16

    @property
    def group(self) -> metrics.Collective:
        """The data-parallel group that shares the evaluation (the trainer's world)."""
        t = self.trainer
        return metrics.Collective(t.rank, t.world_size, t.device)

    @property
    def reference(self) -> ReferenceSet:
        if self._reference is None:
            t = self.trainer
            self._reference = ReferenceSet(
                self.cfg, t.cfg.data.shards, resolution=t.cfg.model.resolution, num_classes=t.cfg.model.num_classes,
                output_dir=t.cfg.train.output_dir, device=t.device,
            )
        return self._reference

    def _warn(self, what: str, err: BaseException) -> None:
        self.failures += 1
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        log.warning("%s (%s); training goes on", what, reason)
        self.trainer.tracker.log_text(f"{what}\n{type(err).__name__}: {err}\n", f"eval/errors/{self.failures:03d}.txt")

    def _score(self, step: int) -> dict[str, float]:
        t = self.trainer
        t0 = time.perf_counter()
        self.reference.prepare(self.group)
        G_eval = shared_copy(t.ema.model, self.reference, truncation=self.cfg.truncation, device=t.device,
                             group=self.group, bf16=self.bf16)
        result = score(t.ema.model, self.reference, num_classes=t.cfg.model.num_classes,
                       truncation=self.cfg.truncation, device=t.device, group=self.group, bf16=self.bf16,
                       G_eval=G_eval)
        self._scored = (step, self.cfg.truncation, dict(result))
        if self.cfg.cas_samples:  # the ranks share the sampling; rank 0 trains the classifier
            result |= cas(t.ema.model, self.reference, num_classes=t.cfg.model.num_classes, device=t.device,
                          bf16=self.bf16, group=self.group,
                          G_eval=G_eval if not self.cfg.truncation else None)  # CAS samples without truncation
        result["seconds"] = time.perf_counter() - t0
        self.latest = result
        return result

    # -- rank 0 ------------------------------------------------------------------------------------------------
    def _record(self, step: int, info: CheckpointInfo | None, result: dict[str, float]) -> None:
        """Rank 0: log the metrics; a new best FID marks the checkpoint and registers it."""
        t = self.trainer
        t.tracker.log_metrics({f"eval/{k}": v for k, v in result.items()}, step=step)
        fid = result["fid"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "seconds")
        print(f"[eval] step {step}: {shown} ({result['seconds']:.0f}s on {t.world_size} rank(s), "
              f"{self.reference.extractor().name})", flush=True)
        if math.isfinite(fid) and info is not None and fid < self._best_so_far():
            self._new_best(step, info, fid)

    def _best_so_far(self) -> float:
        """The store's best FID (survives restarts; a rollback forgets bests after its step)."""
        best = self.trainer.store.labels().get("best")
        if best and best.get("metric") == "fid" and best.get("fid") is not None:
            return float(best["fid"])
        return math.inf

    def _new_best(self, step: int, info: CheckpointInfo, fid: float) -> None:
        t = self.trainer
        t.store.mark_best(step, fid)
        log.info("evaluation: step %d is the best so far (fid %.4g)", step, fid)
        if not t.tracker.enabled:
            return
        t.tracker.set_tags({"best_fid": f"{fid:.6g}", "best_fid_step": step})
        # a local copy for the tracker's background upload (the store may be remote, retention may delete it)
        local = t.work_dir / "eval" / f"step-{step:08d}" / CHECKPOINT_FILE
        local.parent.mkdir(parents=True, exist_ok=True)
        t.store.fs.get_file(f"{info.path}/{CHECKPOINT_FILE}", str(local))
        artifact_path = f"checkpoints/step-{step:08d}"
        t.tracker.log_artifact(local, artifact_path, delete_after=True)  # deleted once uploaded, not before
        name = self.cfg.register_model.replace("{preset}", t.cfg.preset)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-registry")
        self._pending.append(self._pool.submit(self._register, local, artifact_path, name, fid, step))

    def _register(self, local: Path, artifact_path: str, name: str, fid: float, step: int) -> None:
        """Background: once the tracker has uploaded the artifact, register it (name "" = only upload).
        The tracker deletes `local` once its upload succeeded (log_artifact delete_after), never before."""
        t = self.trainer
        if not t.tracker.flush(timeout=REGISTER_WAIT_S):
            raise TimeoutError(f"the upload of {artifact_path} did not finish in {REGISTER_WAIT_S:.0f}s")
        if not name:
            return
        run_id = t.tracker.run_id
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=t.tracker.tracking_uri)
        if not any(f.path.endswith(CHECKPOINT_FILE) for f in client.list_artifacts(run_id, artifact_path)):
            raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}/{CHECKPOINT_FILE}")
        version = metrics.register_best(run_id, artifact_path, name, t.cfg, t.class_names, fid, step=step,
                                        tracking_uri=t.tracker.tracking_uri)
        t.tracker.set_tags({"best_model_version": f"{name}/{version.version}"})
        print(f"[eval] registered {name} version {version.version} (fid {fid:.4g}, step {step})", flush=True)

    def _sweep(self, thresholds: list[float]) -> list[dict[str, float]]:
        """Every rank scores each threshold; rank 0 logs the numbers and the plot."""
        t = self.trainer
        results = []
        for threshold in thresholds:
            if self._scored is not None and self._scored[:2] == (t.step, threshold):
                row = dict(self._scored[2])  # the final evaluation just scored this G at this threshold
            else:
                row = score(t.ema.model, self.reference, num_classes=t.cfg.model.num_classes, truncation=threshold,
                            device=t.device, group=self.group, bf16=self.bf16)
            results.append({"truncation": float(threshold), **row})
            if t.rank == 0:
                label = f"{threshold:g}" if threshold > 0 else "none"
                t.tracker.log_metrics({f"truncation/{label}/{k}": v for k, v in row.items()}, step=t.step)
                print(f"[eval] truncation {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        if t.rank != 0:
            return results
        folder = t.work_dir / "eval"
        plot = metrics.plot_truncation_sweep(results, folder / "truncation_sweep.png")
        t.tracker.log_artifact(plot, "eval")
        t.tracker.log_text(json.dumps({"step": t.step, "results": results}, indent=1), "eval/truncation_sweep.json")
        return results

