"""What a trainer checkpoint holds, and how every rank writes it to the store and reads it back.

A checkpoint is the two DeepSpeed engines (weights and optimizer moments), `trainer.pt` (the parts every rank
shares, written by rank 0), `rank<r>.pt` (each rank's own random streams and buffers) and `g_ema.pt` (EMA G
alone, for sampling and evaluation elsewhere). The parts are named in one place, `Snapshot.shared` and
`Snapshot.per_rank`: a new piece of state is one more `Part(save, load)` there, nothing else changes.

Loading runs no code: every file is read with `torch.load(weights_only=True)`; DeepSpeed's own files are
read through `WeightsOnlyCheckpointEngine`, which allows exactly the few DeepSpeed types its ZeRO files hold.
A file that needs anything else (a planted pickle) is refused with `UnsafeCheckpointError` naming the file,
and `restore` falls back to the previous good checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pipeline.checkpoint import CheckpointInfo, CorruptCheckpointError, digests, rng_state, set_rng_state

if TYPE_CHECKING:
    from pipeline.trainer import Trainer

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.pt"
EXPORT_FILE = "g_ema.pt"
ENGINE_DIRS = ("g", "d")
ENGINE_TAG = "ckpt"


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint file would need more than tensors and plain types to load: it is refused, not run."""


def _deepspeed_types() -> list[type]:
    """The only non-plain types DeepSpeed 0.19's ZeRO optimizer files hold (measured on fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = "cpu", allow: list[type] | None = None) -> Any:
    """torch.load with weights_only=True (plus exactly `allow`); refusals and torn files name the file."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(f"{path}: refused to load, it holds more than tensors and plain types ({first})") from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from err


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with a `load` that runs no code; everything else is the wrapped engine's."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._allow = _deepspeed_types()

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location, allow=self._allow)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def load_weights_only(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints with weights_only=True (idempotent)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)


@dataclass
class Part:
    """One named piece of trainer state: `save()` returns tensors and plain types, `load(value)` restores it
    (None: saved for the record only, e.g. the config)."""

    save: Callable[[], Any]
    load: Callable[[Any], None] | None = None


def _set(obj: Any, name: str) -> Callable[[Any], None]:
    return lambda value: setattr(obj, name, value)


class Snapshot:
    """The checkpoint of one Trainer: its named parts, and save / load / restore on every rank."""

    def __init__(self, trainer: Trainer):
        t = self.trainer = trainer
        for engine in (t.g_engine, t.d_engine):
            load_weights_only(engine)
        # loaded in this order (recovery, which holds the data seed, before data_position: reopening the loader uses it)
        self.shared: dict[str, Part] = {
            "step": Part(lambda: t.step, _set(t, "step")),
            "d_steps_done": Part(lambda: t.d_steps_done, _set(t, "d_steps_done")),
            "ema": Part(t.ema.state_dict, t.ema.load_state_dict),
            # rollback budget spent and mitigation in force (lr scale, R1 gamma, data seed): before the loader
            "recovery": Part(t.recovery_state, t.load_recovery_state),
            "data_position": Part(lambda: t.loader.state(), self._load_data_position),
            "mlflow_run_id": Part(lambda: t.tracker.run_id, self._load_run_id),
            "health": Part(t.health.state_dict, t.health.load_state_dict),
            "config": Part(t.cfg.to_dict),
            "class_names": Part(lambda: list(t.class_names)),
        }
        self.per_rank: dict[str, Part] = {
            "rng": Part(rng_state, set_rng_state),
            "noise": Part(t.noise.get_state, lambda s: t.noise.set_state(s.to(t.noise.get_state().device))),
            "replay": Part(t.replay.state_dict, t.replay.load_state_dict),
            "augment_rng": Part(t.augment_rng.get_state, lambda s: t.augment_rng.set_state(s.cpu())),
        }
        self._restore_data = True

    def _load_data_position(self, position: dict) -> None:
        if self._restore_data:
            self.trainer.open_loader(**position)

    def _load_run_id(self, run_id: str | None) -> None:
        if self.trainer.tracker.run_id is None:
            self.trainer.tracker.run_id = run_id

    # -- collectives (no-ops in one process) ------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.trainer.world_size > 1:
            dist.barrier()

    def _gather(self, value: Any) -> list[Any]:
        if self.trainer.world_size <= 1:
            return [value]
        out = [None] * self.trainer.world_size
        dist.all_gather_object(out, value)
        return out

    def _broadcast_step(self, step: int) -> int:
        t = torch.tensor([step], dtype=torch.int64, device=self.trainer.device)
        if self.trainer.world_size > 1:
            dist.broadcast(t, src=0)
        return int(t.item())

    # -- saving -----------------------------------------------------------------------------------------------
    def save(self, metrics: dict | None = None) -> CheckpointInfo:
        t, store = self.trainer, self.trainer.store
        staging = Path(tempfile.mkdtemp(prefix=f"ckpt-{t.step:08d}-", dir=t.work_dir))
        try:
            if t.rank == 0:
                store.begin(t.step)
            self._barrier()
            t.g_engine.save_checkpoint(str(staging / "g"), tag=ENGINE_TAG)
            t.d_engine.save_checkpoint(str(staging / "d"), tag=ENGINE_TAG)
            torch.save({name: part.save() for name, part in self.per_rank.items()}, staging / f"rank{t.rank}.pt")
            if t.rank == 0:
                torch.save({name: part.save() for name, part in self.shared.items()}, staging / TRAINER_FILE)
                # a weights-only file for sampling and evaluation elsewhere: tensors, plain config and names
                torch.save({"g_ema_state": t.ema.state_dict(), "config": t.cfg.to_dict(),
                            "class_names": list(t.class_names), "step": t.step}, staging / EXPORT_FILE)
            # digests where the files were written; a file several ranks wrote is published by the lowest
            every_rank = self._gather(digests(staging))
            owner: dict[str, int] = {}
            for rank, files in enumerate(every_rank):
                for rel in files:
                    owner.setdefault(rel, rank)
            store.publish(t.step, staging, files=[rel for rel, rank in owner.items() if rank == t.rank])
            self._barrier()
            info = None
            if t.rank == 0:
                files = {rel: every_rank[rank][rel] for rel, rank in owner.items()}
                info = store.commit(t.step, files, {
                    "metrics": metrics or {}, "world_size": t.world_size, "mlflow_run_id": t.tracker.run_id,
                })
                store.apply_retention(t.cfg.train.keep_last)
            self._barrier()
            return info or store.get(t.step)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------------------
    def files_for_rank(self, info: CheckpointInfo, rank: int) -> list[str]:
        """What this rank reads: trainer.pt, its rank file, and of the engines' files the model states and its
        own ZeRO partition (DeepSpeed loads no other rank's partition)."""
        wanted = [TRAINER_FILE, f"rank{rank}.pt"]
        for rel in info.meta["files"]:
            parts = rel.split("/")
            if len(parts) == 3 and parts[0] in ENGINE_DIRS and parts[1] == ENGINE_TAG:
                name = parts[2]
                if name.endswith("_model_states.pt") or f"zero_pp_rank_{rank}_" in name:
                    wanted.append(rel)
        return [rel for rel in wanted if rel in info.meta["files"]]

    def load(self, info: CheckpointInfo, restore_data: bool = True) -> None:
        """Load one checkpoint on this rank (verified, weights only). Raises CorruptCheckpointError."""
        t = self.trainer
        restore_dir = t.work_dir / "restore"
        try:
            root = t.store.fetch(info, restore_dir, files=self.files_for_rank(info, t.rank))
            for name, engine in zip(ENGINE_DIRS, (t.g_engine, t.d_engine), strict=True):
                engine.load_checkpoint(str(root / name), tag=ENGINE_TAG)
            shared = safe_load(root / TRAINER_FILE)
            rank_file = root / f"rank{t.rank}.pt"
            # absent when the world size changed: fresh per-rank randomness
            own = safe_load(rank_file) if f"rank{t.rank}.pt" in info.meta["files"] else {}
            self._restore_data = restore_data
            for state, parts in ((shared, self.shared), (own, self.per_rank)):
                for name, part in parts.items():
                    if part.load is None:
                        continue
                    if name not in state:
                        log.warning("rank %d: checkpoint %s has no %r; keeping the current one", t.rank, info.path, name)
                        continue
                    part.load(state[name])
        finally:
            self._restore_data = True
            shutil.rmtree(restore_dir, ignore_errors=True)
        log.info("rank %d: restored step %d from %s", t.rank, t.step, info.path)

    def restore(self, before: int | None = None, healthy: bool = False) -> CheckpointInfo | None:
        """Every rank: load the newest good checkpoint (before step `before`; labelled healthy if asked).

        Rank 0 picks the step and broadcasts it; each rank fetches and verifies only its files. If any rank
        finds the checkpoint corrupt or unsafe, rank 0 quarantines it (logged, tagged in MLflow) and every
        rank tries the previous one. None when no good checkpoint is left."""
        t = self.trainer

        def tag(step: int, reason: str) -> None:
            t.tracker.set_tags({f"checkpoint.quarantined.{step}": reason[:4000]})

        while True:
            step, problem = -1, None
            if t.rank == 0:
                try:
                    found = t.store.newest_good(before=before, healthy=healthy, on_quarantine=tag)
                    step = found.step if found else -1
                except Exception as err:  # noqa: BLE001 - every rank must hear of it, or they wait forever
                    step, problem = -2, err
            step = self._broadcast_step(step)
            if step == -2:
                raise problem or RuntimeError("rank 0 could not pick a checkpoint to restore (see its log)")
            if step < 0:
                return None
            outcome: tuple[str, str] | None = None
            try:
                info = t.store.get(step)
                self.load(info)
            except (CorruptCheckpointError, FileNotFoundError) as err:
                outcome = ("corrupt", str(err))
                log.error("rank %d: checkpoint of step %d is not usable: %s", t.rank, step, err)
            except Exception as err:  # noqa: BLE001 - told to every rank first, so none waits forever
                outcome = ("error", f"{type(err).__name__}: {err}")
            outcomes = [o for o in self._gather(outcome) if o]
            if not outcomes:
                return info
            failures = [why for kind, why in outcomes if kind == "error"]
            if failures:  # not the checkpoint's fault (e.g. the store is unreachable): nothing is quarantined
                raise RuntimeError(f"restoring the checkpoint of step {step} failed: {'; '.join(failures)}")
            reason = "; ".join(why for _, why in outcomes)
            if t.rank == 0:
                t.store.quarantine(step, reason)
                tag(step, reason)
            self._barrier()


def state_fingerprint(trainer: Trainer, ema: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every number an exact resume must reproduce: weights, buffers, EMA G (`ema`, default the trainer's copy as
    it stands) and the optimizers' moments and steps. For comparing two runs; nothing here is saved."""
    out = {}
    for prefix, module in (("G", trainer.G), ("D", trainer.D), ("EMA", trainer.ema.model if ema is None else ema)):
        for k, v in module.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().clone()
    for prefix, engine in (("optG", trainer.g_engine), ("optD", trainer.d_engine)):
        opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for i, state in enumerate(opt.state.values()):
            for k, v in state.items():
                if torch.is_tensor(v):
                    out[f"{prefix}.{i}.{k}"] = v.detach().clone()
    return out
