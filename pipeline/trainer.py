"""The GAN trainer: D steps, then a G step, then the EMA update, then the health check.

One `Trainer` lives on every data-parallel rank. It knows nothing about Ray: the orchestrator hands it the
rank, the loader, the checkpoint store, the tracker and a `report` callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from models.layers import StatsBatchNorm
from models.regularization import orthogonal_penalty
from models.spectral import SpectralNorm, first_layer_sigma0, sigma0s
from pipeline import drills, losses, preemption, tricks
from pipeline.augment import augment_generator, diff_augment
from pipeline.checkpoint import CheckpointInfo, CheckpointStore
from pipeline.class_health import ClassSignals
from pipeline.config import RunConfig, grad_accumulation_steps
from pipeline.cross_replica import install_cross_replica_bn
from pipeline.data.faults import DataFaultError
from pipeline.ema import EMA
from pipeline.engines import build_engines, fp32_master_slices
from pipeline.finetune import init_generator_from
from pipeline.health import HealthMonitor
from pipeline.networks import build_models
from pipeline.performance import resolve
from pipeline.placement import check_placement
from pipeline.preemption import StopAgreement
from pipeline.recovery import Recovery
from pipeline.snapshot import Snapshot
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

SAMPLE_CLASSES = 10  # classes in the fixed sample grid
SAMPLES_PER_CLASS = 8


def eta_seconds(remaining_steps: int, elapsed_s: float, iters: int, warmup_s: float = 0.0) -> float:
    """Seconds left at the pace of the last log window, whose `warmup_s` (a first, compiling iteration) is not the
    pace of the steps to come."""
    if warmup_s > 0 and iters > 1:
        return remaining_steps * max(elapsed_s - warmup_s, 0.0) / (iters - 1)
    return remaining_steps * elapsed_s / max(iters, 1)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        make_loader: Callable[..., object],
        store: CheckpointStore,
        tracker: Tracker,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        class_names: list[str] | None = None,
        report: Callable[[dict, CheckpointInfo | None], None] | None = None,
        inject_collapse_at: int | None = None,
    ):
        self.cfg, self.make_loader, self.store, self.tracker = cfg, make_loader, store, tracker
        self.device, self.rank, self.world_size = device, rank, world_size
        self.class_names = class_names or [str(i) for i in range(cfg.model.num_classes)]
        self.report = report or (lambda metrics, ckpt: None)
        self.inject_collapse_at = inject_collapse_at
        self.accum = grad_accumulation_steps(cfg)
        self.speed = resolve(cfg, device)  # train.precision / channels_last / compile, "auto" decided here
        self.dtype = torch.bfloat16 if self.speed.bf16.on else torch.float32
        self.channels_last = self.speed.channels_last.on
        if rank == 0:
            print(f"[speed] on {device.type}:\n{self.speed.describe()}", flush=True)
        tracker.set_tags(self.speed.tags())
        self.work_dir = Path(cfg.train.output_dir) / "work" / f"rank{rank}"
        self.work_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        G, D = build_models(cfg)
        init_generator_from(cfg, G)  # model.init_from: fine-tuning from released weights
        self.g_engine, self.d_engine = build_engines(cfg, G, D, device, world_size)
        self.G, self.D = self.g_engine.module, self.d_engine.module
        # from the device-resident module, averaging the fp32 masters (engines.fp32_master_slices)
        self.ema = EMA(self.G, cfg.ema.decay, cfg.ema.start_step, power_iterations=cfg.ema.sn_itrs,
                       masters=lambda: fp32_master_slices(self.g_engine))
        if cfg.model.cross_replica_bn:  # after the EMA copy: EMA G normalizes with its own running statistics
            install_cross_replica_bn(self.G, group=self.g_engine.data_parallel_group)
        self.d_has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm | StatsBatchNorm)
                                   for m in self.D.modules())
        self.noise = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank)
        self.augment_rng = augment_generator(cfg.train.seed, rank, device)  # DiffAugment: its own draws per rank
        self.replay = tricks.ReplayBuffer(cfg.tricks.replay_size, cfg.tricks.replay_fraction, seed=cfg.train.seed + rank)
        self.health = HealthMonitor(cfg.health, loss_kind=cfg.loss.kind, num_classes=cfg.model.num_classes)

        self.step = 0  # G steps done
        self.d_steps_done = 0
        self.recovery = Recovery(self)  # rollback count and mitigation state, kept across restarts
        self.stop = StopAgreement(rank, world_size, cfg.train.checkpoint_every_minutes)  # preemption, time cadence
        self.injected = False
        self.status = "running"
        self.fail_once_at: tuple[int, Path] | None = None  # (step, flag file): a drill for worker restarts
        self.base_r1_gamma = cfg.loss.r1_gamma
        self.data_seed = cfg.train.seed
        self.loader = None
        self.open_loader(epoch=0, offset=0)
        self.data_wait = 0.0
        self.train_time = self.health_time = 0.0  # this process's seconds in train_iteration and in health checks
        self.health_checks = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._sample_z, self._sample_y = self._fixed_samples()
        self.class_signals = ClassSignals(self)  # fidelity, diversity, FID of EMA G's fixed health batch
        from pipeline.evaluation import Evaluator

        self.evaluator = Evaluator(self)  # eval.every: FID of EMA G after checkpoints; last_fid for the health check
        self.snapshot = Snapshot(self)  # what a checkpoint holds: add state as a Part in snapshot.shared/per_rank
        check_placement(self)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _fixed_samples(self):
        gen = torch.Generator().manual_seed(1234)
        classes = torch.arange(min(SAMPLE_CLASSES, self.cfg.model.num_classes))
        y = classes.repeat_interleave(SAMPLES_PER_CLASS)
        z = torch.randn(len(y), self.G.dim_z, generator=gen)
        return z.to(self.device), y.to(self.device)

    def sample_latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = tricks.sample_z(n, self.G.dim_z, self.cfg.tricks.z_dist, self.noise, self.device, self.dtype)
        y = torch.randint(0, self.cfg.model.num_classes, (n,), generator=self.noise, device=self.device)
        return z, y

    def next_real(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = next(self.data)
        self.data_wait += time.perf_counter() - t0
        x = x.to(self.device, self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def d_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of any image, real or fake: DiffAugment, then instance noise (both off by default)."""
        if self.cfg.data.diffaug:
            x = diff_augment(x, self.cfg.data.diffaug, generator=self.augment_rng)
        std = tricks.instance_noise_std(self.step, self.cfg.tricks.instance_noise, self.cfg.tricks.instance_noise_decay_steps)
        if std > 0:
            x = tricks.add_instance_noise(x, std, self.noise)
        return x

    def d_forward(self, x: torch.Tensor, y: torch.Tensor, eager: bool = False):
        """D's module, not its engine: the engine's output hooks break torch.autograd.grad (R1, WGAN-GP);
        gradients still reach DeepSpeed, which reduces them in `d_engine.backward`. `eager` for a penalty that
        differentiates D's gradient again: a compiled D's backward cannot be differentiated (aot_autograd has no
        double backward), and a rollback's mitigation can switch R1 on in a compiled run."""
        with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
            out = self.D(x, y)
        return out if isinstance(out, tuple) else (out, None)

    def fresh_fakes(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """G's images for a D step, outside G's graph. A compiled G runs in grad mode and is detached: under
        no_grad it would compile a second, inference graph of G, ~25 s more compilation per process for the demo's
        model on the AMX Xeon and no faster a step (bench/RESULTS.md, "Session 22"). Eager G skips the graph."""
        with torch.enable_grad() if self.speed.compile.on else torch.no_grad():
            return self.G(z, y).detach()

    # -- one D step (accumulated over micro-batches) -------------------------------------------------------------
    def d_step(self) -> None:
        cfg = self.cfg.loss
        r1_now = cfg.r1_gamma > 0 and self.d_steps_done % cfg.r1_interval == 0
        for micro in range(self.accum):
            x_real, y_real = self.next_real()
            z, y_fresh = self.sample_latents(x_real.shape[0])
            x_fresh = self.fresh_fakes(z, y_fresh)
            x_fake, y_fake = self.replay.mix(x_fresh, y_fresh)
            x_real.requires_grad_(r1_now)
            if self.d_has_batchnorm:
                # BatchNorm statistics must not mix real and fake: the G step shows D an all-fake batch
                real_out = self.d_forward(self.d_inputs(x_real), y_real, eager=r1_now)
                fake_out = self.d_forward(self.d_inputs(x_fake), y_fake)
                logits = torch.cat([real_out[0], fake_out[0]])
                class_logits = None if real_out[1] is None else torch.cat([real_out[1], fake_out[1]])
            else:
                logits, class_logits = self.d_forward(
                    torch.cat([self.d_inputs(x_real), self.d_inputs(x_fake)]), torch.cat([y_real, y_fake]), eager=r1_now
                )
            real_logits, fake_logits = logits.float().split([x_real.shape[0], x_fake.shape[0]])
            loss, parts = losses.d_loss(
                cfg.kind, real_logits, fake_logits, label_smoothing=cfg.label_smoothing,
                label_flip=cfg.label_flip, generator=self.noise,
            )
            if class_logits is not None:
                ac = tricks.acgan_loss(class_logits.float(), torch.cat([y_real, y_fake]))
                loss = loss + cfg.acgan_weight * ac
                parts["d_acgan"] = ac.detach()
            if r1_now:
                r1 = losses.r1_penalty(real_logits, x_real)
                # lazy regularization: applied every r1_interval D steps, scaled up by the interval
                loss = loss + 0.5 * cfg.r1_gamma * cfg.r1_interval * r1
                parts["r1"] = r1.detach()
            if cfg.kind == "wgan-gp":
                gp = losses.gradient_penalty(
                    lambda x, y: self.d_forward(x, y, eager=True)[0], x_real, x_fake, y_real, generator=self.noise
                )
                loss = loss + cfg.gp_lambda * gp
                parts["gp"] = gp.detach()
            self.d_engine.backward(loss)
            self._step_engine(self.d_engine, "D", last=micro == self.accum - 1)
            self.replay.push(x_fresh, y_fresh)  # fresh G output only: replayed images are not stored twice
            self._accumulate({"d_loss": loss.detach(), **parts, "d_real_logit": real_logits.detach().mean()})
        self.d_steps_done += 1

    # -- one G step, D frozen (STACK-NOTES GAN traps A and B) ----------------------------------------------------
    def g_step(self) -> None:
        self.D.requires_grad_(False)
        for micro in range(self.accum):
            z, y = self.sample_latents(self.cfg.data.batch_size)
            if self.cfg.loss.mode_seeking > 0:
                y = losses.paired_labels(y)
            x_fake = self.g_engine(z, y)
            logits, class_logits = self.d_forward(self.d_inputs(x_fake), y)
            loss = losses.g_loss(self.cfg.loss.kind, logits.float())
            parts = {"g_loss": loss.detach()}
            if self.cfg.loss.mode_seeking > 0:
                ms = losses.mode_seeking_penalty(x_fake, z)
                loss = loss + self.cfg.loss.mode_seeking * ms
                parts["mode_seeking"] = ms.detach()
            if class_logits is not None:
                loss = loss + self.cfg.loss.acgan_weight * tricks.acgan_loss(class_logits.float(), y)
            if self.cfg.loss.ortho_beta > 0:
                ortho = orthogonal_penalty(self.G, beta=self.cfg.loss.ortho_beta)
                loss = loss + ortho
                parts["ortho"] = ortho.detach()
            self.g_engine.backward(loss)
            self._step_engine(self.g_engine, "G", last=micro == self.accum - 1)
            self._accumulate(parts)
        self.D.requires_grad_(True)

    def _step_engine(self, engine, name: str, last: bool) -> None:
        """engine.step(), and on iterations that get logged, the gradient norm at the accumulation boundary."""
        if not (last and (self.step + 1) % self.cfg.train.log_every == 0):
            engine.step()
            return
        # ZeRO 0 leaves the averaged gradients on the parameters until its step; ZeRO 1 computes the norm itself
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        engine.step()
        norm = engine.get_global_grad_norm()
        if norm is None and grads:
            norm = torch.stack(grads).norm()
        if norm is not None:
            self._accumulate({f"grad_norm/{name}": torch.as_tensor(norm, dtype=torch.float32, device=self.device)})

    def train_iteration(self) -> None:
        for _ in range(self.cfg.loss.d_steps):
            self.d_step()
        self.g_step()
        self.step += 1
        self.ema.update(self.step)
        if self.step % self.cfg.train.sample_every == 0 or self.step == self.cfg.train.steps:
            self.ema.ready()  # collective: every rank, before rank 0 samples
        if self.inject_collapse_at is not None and self.step == self.inject_collapse_at and not self.injected:
            self.inject_collapse()

    # -- metrics -----------------------------------------------------------------------------------------------
    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.float()
            self._sums[k + "__n"] = self._sums.get(k + "__n", 0.0) + 1.0

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean over ranks of a dict of scalar tensors, in one all-reduce; the only host sync of a log step."""
        if not values:
            return {}
        keys = sorted(values)
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in keys])
        if self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def clear_metrics(self) -> None:
        self._sums, self.data_wait = {}, 0.0

    def take_metrics(self) -> dict[str, float]:
        means = {k: self._sums[k] / self._sums[k + "__n"] for k in self._sums if not k.endswith("__n")}
        self._sums = {}
        return self._reduce(means)

    def trick_metrics(self) -> dict[str, float]:
        """What the optional tricks are doing, logged only when they are on."""
        out = {}
        t = self.cfg.tricks
        if t.instance_noise > 0:
            out["tricks/instance_noise_std"] = tricks.instance_noise_std(self.step, t.instance_noise, t.instance_noise_decay_steps)
        if self.replay.enabled:
            out.update({f"tricks/{k}": v for k, v in self.replay.stats().items()})
        return out

    def spectral_signals(self) -> dict[str, torch.Tensor]:
        g = {f"sigma0/G/{k}": v for k, v in sigma0s(self.G).items()}
        d = {f"sigma0/D/{k}": v for k, v in sigma0s(self.D).items()}
        return {**g, **d}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def recovery_state(self) -> dict:
        return self.recovery.state_dict()

    def load_recovery_state(self, state: dict) -> None:
        self.recovery.load_state_dict(state)

    @property
    def rollbacks(self) -> int:
        return self.recovery.rollbacks

    @property
    def rollback_log(self) -> list[tuple[int, int]]:
        return self.recovery.log

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, metrics: dict | None = None) -> CheckpointInfo:
        self.ema.ready()  # collective: the whole average, with its own spectral norms
        info = self.snapshot.save(metrics)
        self.stop.saved()  # the time cadence counts from every committed checkpoint, whatever asked for it
        return info

    def open_loader(self, epoch: int, offset: int, **faults) -> None:
        """(Re)start the data stream at a position, with the current data seed."""
        if self.loader is not None and hasattr(self.loader, "close"):
            self.loader.close()
        self.loader = self.make_loader(epoch=epoch, offset=offset, seed=self.data_seed)
        if faults:  # shards quarantined earlier in the run (pipeline/data/faults.py)
            self.loader.restore_faults(**faults)
        self.data = iter(self.loader)

    def reseed_data(self, offset: int) -> None:
        """Continue from the same data position with a different shuffling seed."""
        self.data_seed = self.cfg.train.seed + 1000 * offset
        self.open_loader(**self.loader.state())

    def load_checkpoint(self, info: CheckpointInfo, restore_data: bool = True) -> None:
        self.snapshot.load(info, restore_data=restore_data)

    def restore(self, before: int | None = None, healthy: bool = False) -> CheckpointInfo | None:
        """The newest good checkpoint on every rank (corrupt ones quarantined); None if there is none."""
        return self.snapshot.restore(before=before, healthy=healthy)

    # -- collapse drill -----------------------------------------------------------------------------
    def inject_collapse(self) -> None:
        drills.inject_collapse(self)

    # -- the loop ----------------------------------------------------------------------------------------------
    def log_samples(self) -> None:
        from pipeline.sample import save_grid

        G_ema = self.ema.ready().eval()  # already assembled on every rank (train_iteration)
        with torch.no_grad():
            images = G_ema(self._sample_z, self._sample_y).float().cpu()
        path = self.work_dir / f"samples_{self.step:08d}.png"
        save_grid(images, path, nrow=SAMPLES_PER_CLASS)
        self.tracker.log_artifact(path, "samples")

    def health_signals(self, losses_now: dict[str, float]) -> dict[str, float]:
        """Everything the monitor judges, averaged over ranks in one all-reduce."""
        G_ema = self.ema.ready()
        if self.class_signals.on:  # one batch of EMA-G samples serves every sample signal
            images = self.class_signals.images(G_ema)
            local = {"variety": images.std(dim=0).mean(), **self.class_signals.measure(images)}
        else:
            local = {"variety": self.health.sample_variety(G_ema, self._sample_z, self._sample_y)}
        d_sigmas = [v.float() for k, v in self.spectral_signals().items() if k.startswith("sigma0/D/")]
        if d_sigmas:  # spectrally normalized nets (BigGAN); DCGAN has none
            local["sigma0_d_max"] = torch.stack(d_sigmas).max()
        if isinstance(getattr(self.G, "linear", None), SpectralNorm):
            local["sigma0_g_first"] = first_layer_sigma0(self.G)
        signals = {**losses_now, **self._reduce(local)}
        fid = self.evaluator.take_fid()  # the same on every rank (each computes it from all-reduced statistics)
        if fid is not None:
            signals["fid"] = fid
        return signals

    def check_health(self, losses_now: dict[str, float]):
        t0 = time.perf_counter()
        decision = self.health.observe(self.step, self.health_signals(losses_now))
        alarm = torch.tensor([1.0 if decision.alarm else 0.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(alarm, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        raised_here, decision.alarm = decision.alarm, bool(alarm.item())
        if decision.alarm and not raised_here:
            decision.reason = "another rank raised the alarm"
        shown = {f"health/{k}": v for k, v in decision.evidence["signals"].items() if k.startswith(("class_", "variety"))}
        took = time.perf_counter() - t0
        self.health_time, self.health_checks = self.health_time + took, self.health_checks + 1
        self.tracker.log_metrics({"health/alarm": float(decision.alarm), "health/check_s": took, **shown}, step=self.step)
        if decision.alarm or decision.held:
            self.tracker.log_text(decision.explain(), f"health/decision_{self.step:08d}.txt")
        return decision

    def _health_cost(self) -> str:
        if not self.health_checks or self.train_time <= 0:
            return ""
        return (f"; {self.health_checks} health checks took {self.health_time:.0f}s, "
                f"{100 * self.health_time / self.train_time:.1f}% of the training steps' {self.train_time:.0f}s")

    def fit(self) -> dict:
        cfg = self.cfg.train
        if self.rank == 0:
            log.info("training from step %d to %d on %d worker(s)", self.step, cfg.steps, self.world_size)
        start, last_log_step = time.time(), self.step
        metrics: dict[str, float] = {}
        self.recovery.ensure_initial_checkpoint()  # a place to return to before the first healthy checkpoint
        if self.cfg.health.enabled:
            self.class_signals.setup()  # every rank: the dataset classifier, from rank 0 (trained once if absent)
        last_log_t = time.time()  # the set-up above is not a step: the first window's step time leaves it out
        window_warmup_s: float | None = None  # the first iteration compiles (minutes under torch.compile): not in the ETA
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            self.train_iteration()
            step_time = time.perf_counter() - t0
            self.train_time += step_time
            if window_warmup_s is None:
                window_warmup_s = step_time
            self._maybe_fail_once()
            boundary = self.stop.check()  # agreed by every rank: preempted? time-based checkpoint due?

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                metrics = self.take_metrics()
                metrics.update(self.trick_metrics())
                metrics.update(self.sync_data_faults())
                now = time.time()
                iters = self.step - last_log_step
                elapsed = max(now - last_log_t, 1e-9)
                metrics["images_per_s"] = iters * cfg.global_batch * self.cfg.loss.d_steps / elapsed
                metrics["step_time_s"] = elapsed / max(iters, 1)
                metrics["data_wait_s"] = self.data_wait / max(iters, 1)
                metrics["last_step_time_s"] = step_time
                eta = eta_seconds(cfg.steps - self.step, elapsed, iters, window_warmup_s)
                self.data_wait, last_log_t, last_log_step, window_warmup_s = 0.0, now, self.step, 0.0
                sig = {k: float(v) for k, v in self._reduce(self.spectral_signals()).items()}
                self.tracker.log_metrics({**metrics, **sig}, step=self.step)
                if self.rank == 0:
                    print(
                        f"[step {self.step}/{cfg.steps}] {metrics['images_per_s']:.1f} img/s "
                        f"d_real {metrics.get('d_loss_real', math.nan):.3f} d_fake {metrics.get('d_loss_fake', math.nan):.3f} "
                        f"g {metrics.get('g_loss', math.nan):.3f} step {metrics['step_time_s']:.2f}s "
                        f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                        flush=True,
                    )

            if self.cfg.health.enabled and self.step % self.cfg.health.every == 0:
                decision = self.check_health(metrics if self.step % cfg.log_every == 0 else self.take_metrics_peek())
                if decision.alarm:
                    if self.rank == 0:
                        print(f"[health] collapse at step {self.step}: {decision.reason}", flush=True)
                    if not self.recovery.recover(decision):  # commits a checkpoint after rolling back
                        self.status = "collapsed"
                        break
                    last_log_t, last_log_step = time.time(), self.step
                    if boundary.stop:  # the rollback's checkpoint is the one to resume from
                        self.status = "preempted"
                        break
                    continue
                for step in self.health.newly_healthy():
                    if self.rank == 0:
                        self.store.mark_healthy(step)

            if self.rank == 0 and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                self.log_samples()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or boundary.save or boundary.stop:
                info = self.save_checkpoint(metrics)
                self.health.checkpoint_saved(self.step)
                self.report({**metrics, "step": self.step}, info)
                if not boundary.stop:
                    self.evaluator.after_checkpoint(self.step, info)
            if boundary.stop and self.step < cfg.steps:
                self.status = "preempted"
                break

        self.stop.close()
        if self.status == "running":
            self.status = "finished"
        if self.status != "preempted":  # a preempted run finishes these when it resumes and ends
            self.ema.ready()
            self.evaluator.finish()  # every rank: truncation sweep (eval.truncation_sweep); rank 0: pending registrations
        if self.rank == 0 and self.status == "finished":
            self.write_review_sheets()
        if self.rank == 0:
            healthy = self.store.newest_healthy()
            if self.status == "collapsed" and healthy and not self.store.labels().get("best"):
                self.store.mark_best(healthy.step, None, metric="newest_healthy")
            best = self.store.labels().get("best")
            self.tracker.set_tags({
                "status": self.status,
                "best_checkpoint": best["step"] if best else (healthy.step if healthy else "none"),
            })
            why = f" ({preemption.reason()})" if self.status == "preempted" else ""
            print(f"[{self.status}] step {self.step} in {time.time() - start:.0f}s{why}{self._health_cost()}", flush=True)
        return {"status": self.status, "step": self.step, "rollbacks": self.rollbacks, "run_id": self.tracker.run_id}

    def write_review_sheets(self) -> None:
        """Rank 0: the labelled final class grid and the interpolation sheet (pipeline/review_sheets.py)."""
        from pipeline.review_sheets import write_review_sheets

        try:
            paths = write_review_sheets(self)
        except Exception as err:  # noqa: BLE001 - a picture must never fail a finished run
            log.warning("review sheets failed (%s: %s)", type(err).__name__, err)
            return
        print(f"[review] final class grid {paths['final_grid']}, interpolation sheet {paths['interpolation']}",
              flush=True)

    def _maybe_fail_once(self) -> None:
        drills.fail_once(self)

    def sync_data_faults(self) -> dict[str, float]:
        """Every rank: agree on bad shards (data/* metrics). Past the budget the run stops with an error naming
        the shards; its metrics are logged first, so tracking shows why."""
        if not hasattr(self.loader, "sync_faults"):
            return {}
        try:
            return self.loader.sync_faults(self.cfg.data.max_bad_fraction)
        except DataFaultError as err:
            self.tracker.log_metrics(err.metrics, step=self.step)
            raise

    def take_metrics_peek(self) -> dict[str, float]:
        """Loss means since the last log, without resetting them (health checks between log steps)."""
        means = {k: self._sums[k] / self._sums[k + "__n"] for k in self._sums if not k.endswith("__n")}
        return self._reduce(means)
