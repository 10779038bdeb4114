"""Collapse detection: judge each training signal against the run's own recent history.

Brock et al. 2019 (section 4) describe how large BigGAN runs collapse: sigma0 of G's first layer grows then
explodes, D's sigma0 jumps, D's loss falls to about zero then spikes, samples lose variety. The monitor keeps
a trailing window of each signal and raises an alarm when a rule fires; every decision carries its evidence.
A checkpoint becomes healthy once `healthy_after` alarm-free checks have followed it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from pipeline.config import HealthConfig
from pipeline.engines import reset_adam


@dataclass
class Decision:
    step: int
    alarm: bool = False
    reason: str = ""
    onset_step: int = 0
    evidence: dict = field(default_factory=dict)

    def explain(self) -> str:
        verdict = "COLLAPSE" if self.alarm else "ok"
        return f"step {self.step}: {verdict} {self.reason}\nonset step: {self.onset_step}\nevidence: " + json.dumps(
            self.evidence, indent=1, default=float
        )


def _median(values) -> float:
    return statistics.median(values) if values else math.nan


class HealthMonitor:
    def __init__(self, cfg: HealthConfig, loss_kind: str = "hinge"):
        self.cfg = cfg
        # a WGAN critic's loss is a negative distance estimate, not a probability: "near zero" means nothing
        self.use_d_loss_floor = loss_kind != "wgan-gp"
        self.history: dict[str, deque] = {}
        self.low_d_loss = 0
        self.pending: dict[int, int] = {}  # checkpoint step -> alarm-free checks since it was saved
        self._healthy: list[int] = []
        self.last_ok_step = 0

    # -- signals -----------------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def sample_variety(G, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean per-pixel std over a fixed batch of EMA-G samples: falls towards 0 as samples lose variety."""
        n = min(16, z.shape[0])
        idx = torch.linspace(0, z.shape[0] - 1, n, device=z.device).long()
        images = G(z[idx].to(next(G.parameters()).dtype), y[idx]).float()
        return images.std(dim=0).mean()

    def _trailing(self, name: str) -> deque:
        return self.history.setdefault(name, deque(maxlen=self.cfg.window))

    def observe(self, step: int, signals: dict[str, float]) -> Decision:
        """Judge one set of signals (identical on every rank: they are all-reduced before)."""
        c = self.cfg
        d = Decision(step=step, onset_step=step)
        watched = {k: v for k, v in signals.items() if k.startswith(("d_loss", "g_loss", "grad_norm", "sigma0", "r1"))}
        bad = sorted(k for k, v in watched.items() if not math.isfinite(v))
        if bad:
            d.alarm, d.reason = True, f"non-finite values: {', '.join(bad)}"
            d.onset_step = self.last_ok_step
            d.evidence = {k: str(watched[k]) for k in bad}
            return self._finish(d, signals)

        warming_up = step < c.warmup_steps  # history is still gathered; only non-finite values alarm
        checks = []
        g_sigma = signals.get("sigma0_g_first")
        if g_sigma is not None:
            checks.append(("sigma0_g_first", g_sigma, c.sigma_ratio, "above"))
        d_sigma = signals.get("sigma0_d_max")
        if d_sigma is not None:
            checks.append(("sigma0_d_max", d_sigma, c.d_sigma_ratio, "above"))
        if "variety" in signals:
            checks.append(("variety", signals["variety"], c.variety_ratio, "below"))
        if "fid" in signals:
            checks.append(("fid", signals["fid"], c.fid_ratio, "above"))
        for name, value, ratio, direction in checks:
            past = self._trailing(name)
            if len(past) < c.min_history or warming_up:
                continue
            med = _median(past)
            fired = value > ratio * med if direction == "above" else value < ratio * med
            if fired:
                d.alarm = True
                d.reason = f"{name} = {value:.4g} is {direction} {ratio} x its trailing median {med:.4g}"
                d.evidence[name] = {"value": value, "trailing_median": med, "ratio": ratio, "history": len(past)}
                break

        d_total = signals.get("d_loss_real", math.nan) + signals.get("d_loss_fake", math.nan)
        if math.isfinite(d_total) and self.use_d_loss_floor and not warming_up:
            self.low_d_loss = self.low_d_loss + 1 if d_total < c.d_loss_floor else 0
            if not d.alarm and self.low_d_loss >= c.d_loss_patience:
                d.alarm = True
                d.reason = f"D loss {d_total:.4g} below {c.d_loss_floor} for {self.low_d_loss} checks"
                d.evidence["d_loss"] = {"value": d_total, "floor": c.d_loss_floor, "checks": self.low_d_loss}
        if d.alarm:
            d.onset_step = self.last_ok_step
        return self._finish(d, signals)

    def _finish(self, d: Decision, signals: dict[str, float]) -> Decision:
        d.evidence.setdefault("signals", {k: v for k, v in signals.items() if not k.startswith("sigma0/")})
        if d.alarm:
            self.pending.clear()
            return d
        for name in ("sigma0_g_first", "sigma0_d_max", "variety", "fid"):
            if name in signals and math.isfinite(signals[name]):
                self._trailing(name).append(signals[name])
        self.last_ok_step = d.step
        for step in list(self.pending):
            self.pending[step] += 1
            if self.pending[step] >= self.cfg.healthy_after:
                self._healthy.append(step)
                del self.pending[step]
        return d

    def checkpoint_saved(self, step: int) -> None:
        self.pending[step] = 0

    def newly_healthy(self) -> list[int]:
        out, self._healthy = self._healthy, []
        return out

    def reset_after_rollback(self) -> None:
        self.pending.clear()
        self.low_d_loss = 0

    def state_dict(self) -> dict:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "low_d_loss": self.low_d_loss,
            "pending": dict(self.pending),
            "last_ok_step": self.last_ok_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque(v, maxlen=self.cfg.window) for k, v in state["history"].items()}
        self.low_d_loss = state["low_d_loss"]
        self.pending = {int(k): v for k, v in state["pending"].items()}
        self.last_ok_step = state["last_ok_step"]


def apply_mitigation(trainer, spec: str, rollbacks: int) -> list[str]:
    """Make the retry less likely to collapse the same way; returns what was done (for the log)."""
    done = []
    actions = [a.strip() for a in spec.split(",") if a.strip()]
    if "halve_lr" in actions:
        scale = 0.5**rollbacks
        for engine, base in ((trainer.g_engine, trainer.cfg.optim.g_lr), (trainer.d_engine, trainer.cfg.optim.d_lr)):
            for group in engine.optimizer.param_groups:
                group["lr"] = base * scale
        done.append(f"learning rates x{scale:g}")
    if "double_r1" in actions:
        base = trainer.base_r1_gamma or 0.1  # a run without R1 gets a small one
        trainer.cfg.loss.r1_gamma = base * 2**rollbacks
        done.append(f"r1_gamma = {trainer.cfg.loss.r1_gamma:g}")
    if "reset_d_opt" in actions:
        reset_adam(trainer.d_engine)
        done.append("D optimizer reset (moments and step count)")
    if "reseed_data" in actions:
        trainer.reseed_data(rollbacks)
        done.append(f"data order reseeded (+{rollbacks})")
    return done
