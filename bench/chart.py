"""One PNG: time from webhook receipt to ``stored`` under load (from the worker benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def time_to_stored_chart(latency: dict[str, Any], path: Path) -> Path | None:
    """Cumulative share of items stored within t seconds, with p50/p99 and the 5 s goal.

    Returns None when the result has no samples (the scenario did not run).
    """
    samples = sorted(float(s) for s in latency.get("samples") or [])
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    shares = [(i + 1) / len(samples) for i in range(len(samples))]
    ax.step(samples, shares, where="post", label="items stored")
    for name, style in (("p50_seconds", ":"), ("p99_seconds", "--")):
        value = latency.get(name)
        if value is not None:
            ax.axvline(value, linestyle=style, color="grey", label=f"{name[:3]} {value:.2f} s")
    ax.axvline(latency.get("goal_p99_seconds", 5.0), color="red", label="p99 goal")
    ax.set_xlabel("seconds from webhook receipt to stored")
    ax.set_ylabel("share of items")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"{latency.get('events')} events at {latency.get('rate_per_second')}/s through the worker"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
