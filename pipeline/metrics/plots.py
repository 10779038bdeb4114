"""Plots of metric results, written as PNG for MLflow (matplotlib with the Agg backend)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path


def plot_truncation_sweep(results: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """Write a PNG of a truncation sweep: FID and IS against the threshold, and the IS-vs-FID trade-off.

    `results` is truncation_sweep's output; without IS only the FID panel is drawn.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
    # threshold 0 means no truncation, the weakest setting: draw it right of the largest threshold
    finite = [r["truncation"] for r in results if r["truncation"] > 0]
    none_x = max(finite) * 1.25 if finite else 1.0
    rows = sorted(results, key=lambda r: r["truncation"] if r["truncation"] > 0 else math.inf)
    t = [r["truncation"] if r["truncation"] > 0 else none_x for r in rows]
    fid = [r["fid"] for r in rows]
    has_is = all("is_mean" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_is else 1, figsize=(10 if has_is else 5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(t, fid, "o-", color="tab:blue", label="FID")
    ax.set_xlabel("truncation threshold")
    ax.set_xticks(t, [f"{r['truncation']:g}" if r["truncation"] > 0 else "none" for r in rows])
    ax.set_ylabel("FID (lower is better)", color="tab:blue")
    ax.set_title("metrics vs truncation")
    ax.grid(alpha=0.3)
    if has_is:
        is_mean = [r["is_mean"] for r in rows]
        twin = ax.twinx()
        twin.errorbar(t, is_mean, yerr=[r.get("is_std", 0.0) for r in rows], fmt="s--", color="tab:red", label="IS")
        twin.set_ylabel("Inception Score (higher is better)", color="tab:red")
        trade = axes[0][1]
        trade.plot(is_mean, fid, "o-", color="tab:purple")
        for r in rows:
            label = f"{r['truncation']:g}" if r["truncation"] > 0 else "none"
            trade.annotate(label, (r["is_mean"], r["fid"]), textcoords="offset points", xytext=(4, 4))
        trade.set_xlabel("Inception Score")
        trade.set_ylabel("FID")
        trade.set_title("IS / FID trade-off (labels: threshold)")
        trade.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out
