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

    @property
    def held(self) -> bool:
        """A D-side jump that G's quality did not follow: no alarm, but worth a record in the run."""
        return "held" in self.evidence

    def explain(self) -> str:
        verdict = "COLLAPSE" if self.alarm else "ok"
        return f"step {self.step}: {verdict} {self.reason}\nonset step: {self.onset_step}\nevidence: " + json.dumps(
            self.evidence, indent=1, default=float
        )


# signals whose trailing window the ratio rules compare with (alarm-free checks only)
TRAILING = ("sigma0_g_first", "sigma0_d_max", "variety", "fid", "class_fidelity", "class_diversity", "class_fid",
            "grad_norm/G")


def _median(values) -> float:
    return statistics.median(values) if values else math.nan


def _class_fid_agrees(fid: float, window, ratio: float) -> tuple[bool, float | None]:
    """Whether EMA G's class FID corroborates a rule another signal raised: at least ratio x the best class FID of
    the rule's window, and that best. The best, not the median: a run still improving has a median far above
    today's FID. Without a class FID or a window, or with ratio 0, the other signal stands alone (best None)."""
    window = [f for f in window if math.isfinite(f)]
    if ratio == 0 or not math.isfinite(fid) or not window:
        return True, None
    best = min(window)
    return fid >= ratio * best, best


def _fid_vs_best(fid: float, best: float) -> str:
    return f"class FID {fid:.4g} is {fid / best:.2g}x the window's best {best:.4g}"


def _r_squared(x: list[float], y: list[float]) -> float:
    """Share of y's variance a least-squares line through (x, y) explains (1 = a straight line)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy * sxy / (sxx * syy)


class HealthMonitor:
    def __init__(self, cfg: HealthConfig, loss_kind: str = "hinge", num_classes: int = 10):
        self.cfg = cfg
        self.chance = 1.0 / max(num_classes, 1)  # class fidelity of a G that ignores its labels
        # a WGAN critic's loss is a negative distance estimate, not a probability: "near zero" means nothing
        self.use_d_loss_floor = loss_kind != "wgan-gp"
        self.history: dict[str, deque] = {}
        self.trend: deque = deque(maxlen=cfg.sigma_trend_checks)  # (step, sigma0_g_first, class FID) of quiet checks
        self.extremes: dict[str, float] = {}  # best class signals so far, first class FID (_remember_extremes)
        self.low_d_loss = 0
        self.frozen: list[int] = []  # steps of the consecutive checks at which D's losses had not moved
        self.prev_d: tuple[float, float] | None = None  # (d_loss_real, d_loss_fake) of the previous check
        self.zero_grad: list[int] = []  # steps of the consecutive checks at which G got no gradient at all
        self.zero_grad_prev_step: int | None = None  # the step of the previous check that measured it
        self.zero_grad_onset = 0  # the check before the first of them
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
        self._remember_extremes(signals)
        if not warming_up:
            for rule in (self._ratio_rules, self._floor_rules, self._sigma_trend):
                if rule(d, signals):
                    break

        d_total = signals.get("d_loss_real", math.nan) + signals.get("d_loss_fake", math.nan)
        if math.isfinite(d_total) and self.use_d_loss_floor and not warming_up:
            self.low_d_loss = self.low_d_loss + 1 if d_total < c.d_loss_floor else 0
            if not d.alarm and self.low_d_loss >= c.d_loss_patience:
                d.alarm = True
                d.reason = f"D loss {d_total:.4g} below {c.d_loss_floor} for {self.low_d_loss} checks"
                d.evidence["d_loss"] = {"value": d_total, "floor": c.d_loss_floor, "checks": self.low_d_loss}
        dead_since = self._no_g_gradient(d, signals, warming_up)
        frozen_since = self._frozen_d(d, signals, warming_up)
        since = dead_since if dead_since is not None else frozen_since
        if d.alarm:
            d.onset_step = self.last_ok_step if since is None else since
        return self._finish(d, signals)

    def _no_g_gradient(self, d: Decision, signals: dict[str, float], warming_up: bool) -> int | None:
        """G's gradient norm vanished at health.g_grad_zero_checks measurements in a row: exactly 0, or below
        health.g_grad_vanish_ratio x its trailing median (ortho reg alone still gives G a tiny one). D's output no
        longer depends on its input (dead units) and G learns nothing from it. Faster than the frozen-loss rule,
        which needs the losses' window means to settle first. Returns the onset (the measurement before the
        first vanished one) when it fires."""
        c = self.cfg
        norm = signals.get("grad_norm/G", math.nan)
        if not math.isfinite(norm):  # measured on logged steps only: a check between them has none
            return None
        prev_step, self.zero_grad_prev_step = self.zero_grad_prev_step, d.step
        past = self._trailing("grad_norm/G")
        med = _median(past) if len(past) >= c.min_history else math.nan
        vanished = norm == 0.0 or (c.g_grad_vanish_ratio > 0 and math.isfinite(med) and norm < c.g_grad_vanish_ratio * med)
        if c.g_grad_zero_checks == 0 or not vanished:
            self.zero_grad = []
            return None
        self.zero_grad = [*self.zero_grad, d.step]
        if len(self.zero_grad) == 1:
            self.zero_grad_onset = prev_step if prev_step is not None else max(0, d.step - c.every)
        if d.alarm or warming_up or len(self.zero_grad) < c.g_grad_zero_checks:
            return None
        size = "exactly 0" if norm == 0.0 else f"below {c.g_grad_vanish_ratio:g} x its trailing median {med:.4g} ({norm:.3g})"
        self._fire(d, "g_no_gradient", f"G's gradient norm has been {size} for {len(self.zero_grad)} checks (since "
                   f"step {self.zero_grad[0]}): D gives every input the same output; nothing learns",
                   checks=len(self.zero_grad), since=self.zero_grad_onset, value=norm, trailing_median=med)
        return self.zero_grad_onset

    def _frozen_d(self, d: Decision, signals: dict[str, float], warming_up: bool) -> int | None:
        """D's real and fake losses the same as at the previous check for health.d_frozen_checks checks: D gives
        every input the same output (dead units), so neither network learns any more. Returns the onset (the
        check before the losses froze) when it fires."""
        c = self.cfg
        now = (signals.get("d_loss_real", math.nan), signals.get("d_loss_fake", math.nan))
        before, self.prev_d = self.prev_d, now
        if c.d_frozen_checks == 0 or before is None or not all(map(math.isfinite, (*now, *before))):
            self.frozen = []
            return None
        # both at ~0 is a D that wins outright, not a dead one: the d_loss_floor rule judges that
        still = sum(now) >= c.d_loss_floor and all(abs(a - b) <= c.d_frozen_tol * max(1.0, abs(b))
                                                   for a, b in zip(now, before))
        self.frozen = [*self.frozen, d.step] if still else []
        if d.alarm or warming_up or len(self.frozen) < c.d_frozen_checks:
            return None
        # the losses are window means: the first frozen value was already whole at the check before frozen[0], so
        # D died during the window before that one; its start is the last check D surely worked at
        gap = self.frozen[1] - self.frozen[0] if len(self.frozen) > 1 else c.every
        onset = max(0, self.frozen[0] - 3 * gap)
        self._fire(d, "d_frozen", f"D's losses have not moved for {len(self.frozen)} checks (d_real {now[0]:.4g}, "
                   f"d_fake {now[1]:.4g}, since step {onset}): D gives every input the same output; nothing learns",
                   checks=len(self.frozen), d_real=now[0], d_fake=now[1], since=onset)
        return onset

    # -- rules: each fills the decision and returns True when it fires ---------------------------------------------
    def _ratio_rules(self, d: Decision, signals: dict[str, float]) -> bool:
        """A signal far from its trailing median (the run's own recent history)."""
        c = self.cfg
        rules = [("sigma0_g_first", c.sigma_ratio, "above"), ("sigma0_d_max", c.d_sigma_ratio, "above"),
                 ("variety", c.variety_ratio, "below"), ("fid", c.fid_ratio, "above"),
                 ("class_fidelity", c.fidelity_ratio, "below"), ("class_diversity", c.diversity_ratio, "below"),
                 ("class_fid", c.class_fid_ratio, "above")]
        for name, ratio, direction in rules:
            value, past = signals.get(name), self._trailing(name)
            if value is None or not math.isfinite(value) or len(past) < c.min_history:
                continue
            med = _median(past)
            if name == "class_fidelity" and med < c.fidelity_floor * self.chance:
                continue  # a fidelity that never left chance has nothing to fall from; the floor rule judges it
            fired = value > ratio * med if direction == "above" else value < ratio * med
            corroboration = ""
            if fired and name == "sigma0_d_max":
                past_fids = self._trailing("class_fid")
                fid = signals.get("class_fid", math.nan)
                fired, best = _class_fid_agrees(fid, past_fids if len(past_fids) >= c.min_history else [],
                                                c.d_sigma_quality_ratio)
                if best is not None and fired:
                    corroboration = f", and {_fid_vs_best(fid, best)}"
                elif best is not None:
                    self._hold_d_jump(d, signals, fid, best)
            if fired:
                d.alarm = True
                d.reason = f"{name} = {value:.4g} is {direction} {ratio} x its trailing median {med:.4g}{corroboration}"
                d.evidence[name] = {"value": value, "trailing_median": med, "ratio": ratio, "history": len(past)}
                return True
        return False

    def _hold_d_jump(self, d: Decision, signals: dict[str, float], fid: float, best: float) -> None:
        """A D whose spectra jump while G's samples are as good as before has not (yet) failed the run
        (bench/detector.py's lr_d_high): the check is a held decision, recorded with its numbers."""
        ratio, sigma = self.cfg.d_sigma_quality_ratio, signals["sigma0_d_max"]
        d.evidence["held"] = {"sigma0_d_max": sigma, "class_fid": fid, "class_fid_best": best, "needs": ratio}
        d.reason = (f"no alarm: sigma0_d_max jumped to {sigma:.4g}, but class FID {fid:.4g} is not above "
                    f"{ratio} x the window's best {best:.4g}")

    def _floor_rules(self, d: Decision, signals: dict[str, float]) -> bool:
        """Absolute limits, whatever the history: armed once the run has been clearly on the good side of them."""
        c = self.cfg
        fidelity, diversity, fid = (signals.get(k, math.nan) for k in ("class_fidelity", "class_diversity", "class_fid"))
        floor = c.fidelity_floor * self.chance
        peak = self.extremes.get("class_fidelity_max", 0.0)
        if math.isfinite(fidelity) and fidelity < floor and (peak >= 2 * floor or 0 < c.fidelity_by_step <= d.step):
            why = f"after reaching {peak:.3g}" if peak >= 2 * floor else f"still, at step {d.step}"
            return self._fire(d, "class_fidelity", f"class fidelity {fidelity:.3g} is below {c.fidelity_floor:g} x chance "
                              f"({floor:.3g}) {why}", value=fidelity, floor=floor, peak=peak)
        peak = self.extremes.get("class_diversity_max", 0.0)
        if math.isfinite(diversity) and diversity < c.diversity_floor and peak >= 2 * c.diversity_floor:
            return self._fire(d, "class_diversity", f"intra-class diversity {diversity:.3g} of real data's is below "
                              f"{c.diversity_floor} after reaching {peak:.3g}", value=diversity, floor=c.diversity_floor,
                              peak=peak)
        first, best = self.extremes.get("class_fid_first"), self.extremes.get("class_fid_min")
        if math.isfinite(fid) and first is not None and best <= 0.5 * first and fid >= c.class_fid_ceiling * first:
            return self._fire(d, "class_fid", f"class FID {fid:.4g} is back at {c.class_fid_ceiling} x an untrained "
                              f"G's ({first:.4g}) after reaching {best:.4g}", value=fid, first=first, best=best)
        return False

    def _sigma_trend(self, d: Decision, signals: dict[str, float]) -> bool:
        """A slow, steady climb of G's first-layer sigma0 that the ratio rule's trailing median follows upwards."""
        c = self.cfg
        value = signals.get("sigma0_g_first")
        if value is None or not math.isfinite(value) or value <= 0 or len(self.trend) < c.sigma_trend_checks - 1:
            return False
        points = [*list(self.trend)[-(c.sigma_trend_checks - 1):], (d.step, value)]
        steps = [float(p[0]) for p in points]
        logs = [math.log(p[1]) for p in points]
        rise = value / points[0][1]
        if rise < c.sigma_trend_factor:
            return False
        r2 = _r_squared(steps, logs)
        if r2 < c.sigma_trend_r2:
            return False
        fid = signals.get("class_fid", math.nan)
        agrees, best = _class_fid_agrees(fid, [p[2] for p in self.trend if len(p) > 2], c.sigma_trend_quality_ratio)
        if not agrees:
            return False  # samples as good as the window's best: the climb is how this run learns, not a failure
        quality = "" if best is None else f"; {_fid_vs_best(fid, best)}"
        # NOTE: the onset stays the last quiet check: a climb is an early warning, and returning to where it began
        # (often step 0) threw away runs that were still improving (bench/detector.py, no_ortho_high_lr)
        return self._fire(d, "sigma0_trend", f"sigma0_g_first rose {rise:.3g}x over the last {len(points)} checks "
                          f"(steps {int(steps[0])}-{d.step}, log-linear R^2 {r2:.2f}){quality}", rise=rise, r2=r2,
                          start=points[0][1], value=value, class_fid=fid)

    @staticmethod
    def _fire(d: Decision, name: str, reason: str, **evidence) -> bool:
        d.alarm, d.reason = True, reason
        d.evidence[name] = evidence
        return True

    def _remember_extremes(self, signals: dict[str, float]) -> None:
        """The run's best class signals so far (they arm the floors) and its first class FID (an untrained G's)."""
        e = self.extremes
        for name, better in (("class_fidelity", max), ("class_diversity", max), ("class_fid", min)):
            value = signals.get(name)
            if value is None or not math.isfinite(value):
                continue
            key = f"{name}_{better.__name__}"
            e[key] = better(e.get(key, value), value)
        if "class_fid" in signals and math.isfinite(signals["class_fid"]):
            e.setdefault("class_fid_first", signals["class_fid"])

    def _finish(self, d: Decision, signals: dict[str, float]) -> Decision:
        d.evidence.setdefault("signals", {k: v for k, v in signals.items() if not k.startswith("sigma0/")})
        if d.alarm:
            self.pending.clear()
            return d
        for name in TRAILING:
            if name in signals and math.isfinite(signals[name]):
                self._trailing(name).append(signals[name])
        sigma = signals.get("sigma0_g_first")
        if sigma is not None and math.isfinite(sigma) and sigma > 0:
            self.trend.append((d.step, sigma, signals.get("class_fid", math.nan)))
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
        self.frozen, self.prev_d, self.zero_grad, self.zero_grad_prev_step = [], None, [], None
        self.trend.clear()  # the climb that raised the alarm must not raise it again at the next check

    def state_dict(self) -> dict:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "trend": [list(x) for x in self.trend],
            "extremes": dict(self.extremes),
            "low_d_loss": self.low_d_loss,
            "frozen": list(self.frozen),
            "prev_d": list(self.prev_d) if self.prev_d is not None else None,
            "zero_grad": list(self.zero_grad),
            "zero_grad_onset": self.zero_grad_onset,
            "pending": dict(self.pending),
            "last_ok_step": self.last_ok_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque(v, maxlen=self.cfg.window) for k, v in state["history"].items()}
        self.trend = deque((tuple(x) for x in state.get("trend", [])), maxlen=self.cfg.sigma_trend_checks)
        self.extremes = dict(state.get("extremes", {}))
        self.low_d_loss = state["low_d_loss"]
        self.frozen = [int(x) for x in state.get("frozen", [])]
        self.prev_d = tuple(state["prev_d"]) if state.get("prev_d") is not None else None
        self.zero_grad = [int(x) for x in state.get("zero_grad", [])]
        self.zero_grad_onset = int(state.get("zero_grad_onset", 0))
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
