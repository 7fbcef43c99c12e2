"""Figures of a training run, drawn from its metrics.jsonl (what `alp plot RUN_DIR` writes).

- reward.png: training reward and accuracy, held-out accuracy, per iteration
- ratio_envelope.png: the importance ratio's P2-P98 and P1-P99 bands and median (the ALP paper's diagnostic)
- kl.png: KL estimates (k1, k3) of the update and the train-vs-inference chi-square
- sigma.png: the perturbation's sigma at every perturbed layer
- entropy_length.png: policy entropy and sampled tokens per episode
- staleness.png: versions between the policy that sampled each trained token and the one updated (per iteration, histogram)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

Row = dict[str, float]


def read_metrics(path: str | Path) -> list[Row]:
    """The rows of a metrics JSON Lines file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every figure of the run into RUN_DIR/plots and return their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    sigma_keys = sorted({k for row in rows for k in row if k.startswith("sigma/") and k not in ("sigma/min", "sigma/mean", "sigma/max")})
    figures = {
        "reward.png": _lines(rows, ["rollout/mean_reward", "rollout/avg_at_k", "eval/avg_at_k", "eval/pass_at_k"], "Reward and accuracy",
                             "value", out / "reward.png"),
        "ratio_envelope.png": _ratio_envelope(rows, out / "ratio_envelope.png"),
        "kl.png": _lines(rows, ["kl/k1", "kl/k3", "mismatch/k3", "mismatch/chi2"], "KL and chi-square (behaviour vs trained policy)",
                         "estimate", out / "kl.png"),
        "sigma.png": _lines(rows, sigma_keys, "Perturbation sigma per layer", "sigma", out / "sigma.png", log_y=True),
        "entropy_length.png": _lines(rows, ["entropy/mean", "rollout/sampled_tokens_per_episode"], "Entropy and response length", "value",
                                     out / "entropy_length.png", twin=True),
        "staleness.png": _staleness(rows, out / "staleness.png"),
    }
    for name, figure in figures.items():
        if figure is None:  # said once, so that a missing figure is not a mystery
            print(f"plots: no {name}: {SKIPPED_BECAUSE[name]}", flush=True)
    return [f for f in figures.values() if f is not None]


SKIPPED_BECAUSE = {
    "reward.png": "no iteration logged a reward yet",
    "ratio_envelope.png": "no update step ran (every batch was skipped, or the run stopped before its first update)",
    "kl.png": "no update step ran",
    "sigma.png": "no sigma/* metrics (trainer.algo is not alp, or no update step ran)",
    "entropy_length.png": "no update step or rollout logged them",
    "staleness.png": "no update step ran",
}
"""Why a figure was not drawn: the metrics it plots were never logged."""


def _series(rows: list[Row], key: str, *, positive: bool = False) -> tuple[list[float], list[float]]:
    """(iterations, values) of the rows with a finite `key`; `positive` keeps only values > 0 (for a log axis)."""
    points = [(row["iteration"], row[key]) for row in rows
              if key in row and row[key] is not None and math.isfinite(row[key]) and (row[key] > 0 or not positive)]  # fmt: skip
    return [p[0] for p in points], [p[1] for p in points]


def _lines(rows: list[Row], keys: list[str], title: str, ylabel: str, path: Path, *, log_y: bool = False, twin: bool = False) -> Path | None:
    present = [k for k in keys if _series(rows, k, positive=log_y)[0]]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    axes = [ax, ax.twinx()] if twin and len(present) == 2 else [ax] * len(present)
    for i, (key, axis) in enumerate(zip(present, axes)):
        x, y = _series(rows, key, positive=log_y)
        # Series often coincide (mean reward = accuracy when the reward is correctness): styles keep each one visible.
        axis.plot(x, y, marker=".osd^v"[i % 6] if len(x) < 50 else None, linestyle=("-", "--", ":", "-.")[i % 4], color=f"C{i}",
                  label=key, alpha=0.85)
        if twin and len(present) == 2:
            axis.set_ylabel(key, color=f"C{i}")
    if log_y:
        ax.set_yscale("log")
    _label_iterations(ax, title, None if twin and len(present) == 2 else ylabel)  # twin axes carry their own labels
    return _save(fig, path)


def _ratio_envelope(rows: list[Row], path: Path) -> Path | None:
    x, p50 = _series(rows, "ratio/p50")
    if not x:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for low, high, alpha in (("ratio/p1", "ratio/p99", 0.2), ("ratio/p2", "ratio/p98", 0.4)):
        xs, lo = _series(rows, low)
        _, hi = _series(rows, high)
        ax.fill_between(xs, lo, hi, alpha=alpha, color="C0", label=f"{low[6:].upper()}-{high[6:].upper()}")
    ax.plot(x, p50, color="C0", label="median")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    _label_iterations(ax, "Importance-ratio envelope of the update", "importance ratio (log scale)")
    return _save(fig, path)


def _staleness(rows: list[Row], path: Path) -> Path | None:
    x, mean = _series(rows, "staleness/mean")
    if not x:
        return None
    fig, (over_time, histogram) = plt.subplots(1, 2, figsize=(10, 4))
    over_time.plot(x, mean, color="C0", label="mean")
    over_time.plot(*_series(rows, "staleness/max"), color="C3", label="max")
    _label_iterations(over_time, "Staleness of trained tokens", "policy versions behind")
    prefix = "staleness/tokens_at_lag_"
    tokens: dict[int, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix):
                lag = int(key.removeprefix(prefix))
                tokens[lag] = tokens.get(lag, 0.0) + value
    histogram.bar(list(tokens), list(tokens.values()), color="C0")
    histogram.set_xlabel("policy versions behind")
    histogram.set_ylabel("trained tokens (whole run)")
    histogram.set_title("Staleness histogram")
    return _save(fig, path)


def _label_iterations(ax: plt.Axes, title: str, ylabel: str | None) -> None:
    """Iterations along x, `ylabel` (None: leave the axes' own) and a legend, the title, a light grid."""
    if ylabel is not None:
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
