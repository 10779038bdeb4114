"""Recovery from a health alarm: roll back, mitigate, commit, go on; and remember it all across restarts.

On an alarm every rank restores the newest healthy checkpoint from before the onset (rank 0 picks it and
broadcasts the step; `Trainer.restore` quarantines a corrupt one and takes the one before), clears the metric sums (a NaN summed since the last log must not raise the next alarm),
applies `health.mitigation` and commits a checkpoint at once, so a restart resumes with the rollback counted
and the mitigation in force. A fresh run commits its initial weights as a healthy step-0 checkpoint, so an
alarm before the first healthy checkpoint restarts from the initial weights instead of ending the run; if no
healthy checkpoint exists at all (retention removed it), the mitigation is applied in place when the weights
are still finite. The state (`state_dict`) is tensors-free plain types, saved in every trainer checkpoint
under "recovery".
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pipeline.health import apply_mitigation

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, trainer):
        self.t = trainer
        self.rollbacks = 0  # rollbacks and in-place mitigations: both use up health.max_rollbacks
        self.in_place = 0  # mitigations applied without a checkpoint to return to
        self.lr_scale = 1.0  # both learning rates are base x this (halve_lr)
        self.log: list[tuple[int, int]] = []  # (from step, restored step); -1 = mitigated in place

    # -- state kept in checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        t = self.t
        return {"rollbacks": self.rollbacks, "in_place": self.in_place, "lr_scale": self.lr_scale,
                "r1_gamma": float(t.cfg.loss.r1_gamma), "r1_configured": float(t.base_r1_gamma),
                "data_seed": int(t.data_seed),
                "log": [list(x) for x in self.log]}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the rollback budget spent so far and the mitigation in force (before the loader reopens)."""
        t = self.t
        self.rollbacks, self.in_place = int(state["rollbacks"]), int(state.get("in_place", 0))
        self.lr_scale = float(state["lr_scale"])
        self.log = [tuple(x) for x in state.get("log", [])]
        t.data_seed = int(state["data_seed"])
        configured = state.get("r1_configured", t.base_r1_gamma)
        if configured == t.base_r1_gamma:
            t.cfg.loss.r1_gamma = float(state["r1_gamma"])  # the mitigation's R1 (double_r1) stays in force
        elif t.rank == 0:  # resumed with another loss.r1_gamma: the user's new value wins over the checkpoint's
            log.warning("loss.r1_gamma is %g now, %g when the checkpoint was saved (%g in force): using %g",
                        t.base_r1_gamma, configured, float(state["r1_gamma"]), t.cfg.loss.r1_gamma)
        self.apply_lr_scale()

    def apply_lr_scale(self) -> None:
        t = self.t
        for engine, base in ((t.g_engine, t.cfg.optim.g_lr), (t.d_engine, t.cfg.optim.d_lr)):
            for group in engine.optimizer.param_groups:
                group["lr"] = base * self.lr_scale

    # -- the initial restore point -------------------------------------------------------------------------------
    def ensure_initial_checkpoint(self) -> None:
        """A fresh run with health checks: the initial weights are step 0's healthy checkpoint."""
        t = self.t
        if not t.cfg.health.enabled or t.step != 0 or t.store.list():
            return
        t.save_checkpoint({})
        if t.rank == 0:
            t.store.mark_healthy(0)

    # -- an alarm ------------------------------------------------------------------------------------------------
    def recover(self, decision) -> bool:
        """Every rank, on an agreed alarm: False when the run cannot go on (budget spent, nothing to return to)."""
        t = self.t
        if self.rollbacks >= t.cfg.health.max_rollbacks:
            return False
        from_step = t.step
        kept = self.state_dict()
        # every rank: the newest good healthy checkpoint before the onset (a corrupt one is quarantined)
        restored = t.restore(before=decision.onset_step + 1, healthy=True)
        if restored is None:
            return self._mitigate_in_place(decision)
        step = restored.step
        self.rollbacks = kept["rollbacks"] + 1
        self.in_place, self.log = kept["in_place"], [*map(tuple, kept["log"]), (from_step, step)]
        t.barrier()
        if t.rank == 0:
            t.store.forget_after(step)
        t.barrier()
        done = self._mitigate()
        self._commit()
        if t.rank == 0:
            print(f"[health] rolled back from step {from_step} to {step}; mitigation: {', '.join(done)}", flush=True)
        self._record(decision, from_step, f"rolled back from step {from_step} to step {step}", done,
                     f"step {from_step} -> {step}: {decision.reason}")
        return True

    def _mitigate_in_place(self, decision) -> bool:
        """No healthy checkpoint at all: weights that are still finite get the mitigation where they are."""
        t = self.t
        finite = torch.tensor([1.0 if self._weights_finite() else 0.0], device=t.device)
        if t.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            log.error("rank %d: non-finite weights and no healthy checkpoint to return to", t.rank)
            return False
        self.rollbacks += 1
        self.in_place += 1
        self.log.append((t.step, -1))
        t.health.history.clear()  # the weights stay where they were: relative rules learn their new level
        done = self._mitigate()
        self._commit()
        t.health.checkpoint_saved(t.step)  # not a restore point until a quiet window has followed it
        if t.rank == 0:
            print(f"[health] no healthy checkpoint to return to at step {t.step}; mitigated in place: "
                  f"{', '.join(done)}", flush=True)
        self._record(decision, t.step, "no healthy checkpoint: mitigation applied in place", done,
                     f"step {t.step}: in place: {decision.reason}")
        return True

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for m in (self.t.G, self.t.D) for p in m.parameters())

    def _mitigate(self) -> list[str]:
        t = self.t
        t.clear_metrics()  # the sums since the last log hold the bad values that raised this alarm
        t.health.reset_after_rollback()
        done = apply_mitigation(t, t.cfg.health.mitigation, self.rollbacks)
        if "halve_lr" in t.cfg.health.mitigation:
            self.lr_scale = 0.5**self.rollbacks
        return done

    def _commit(self) -> None:
        """Persist the rollback at once: a restart must not get the budget back or forget the mitigation."""
        t = self.t
        info = t.save_checkpoint({})
        t.report({"step": t.step, "rollbacks": self.rollbacks}, info)

    def _record(self, decision, step: int, what: str, done: list[str], tag: str) -> None:
        tracker = self.t.tracker
        tracker.log_metrics({"rollbacks": self.rollbacks, "health/in_place_mitigations": self.in_place}, step=step)
        tracker.log_text(f"{decision.explain()}\n{what}\nmitigation: {done}\n",
                         f"rollbacks/rollback_{self.rollbacks:02d}_step_{step:08d}.txt")
        tracker.set_tags({f"rollback.{self.rollbacks}": tag})
