"""The mismatch lab's report: tables, verdicts on ALP's four claims, and figures, from the runs' metrics.

`write_report(LAB_DIR)` (`alp lab report LAB_DIR`, also run at the end of `alp lab`) reads lab.json and
every runs/<setting>/<arm>/seed<k>/metrics.jsonl and writes LAB_DIR/report.md and LAB_DIR/figures/*.png.

How the numbers are made (also printed at the top of the report):
- held-out accuracy: the run's last `eval/avg_at_k` (evaluated on the trainer's exact weights, whatever the engine
  serves); mean and sample std over seeds. "held-out mean" averages every evaluation after iteration 0 (learning speed).
- clean envelope: `mismatch/seq_log_width` = ln(P98/P2) of the sequence ratio pi_theta/mu, no noise, on each
  fresh batch before the update. Compared *at matched entropy*: every iteration is put in a bin of the
  sampled tokens' mean NLL under mu (`mismatch/sample_nll`, quartile bins of the setting's pooled values);
  a run's score is its mean excess width over the pooled mean of its bin, so an arm that merely learns
  slower (higher entropy, narrower envelope) is not credited for it.
- KL spikes: iterations whose clean `mismatch/k3` exceeds 5x the median of every iteration of the setting.
- drops: held-out evaluations more than 0.1 below the best earlier one of the same run (a collapse, recovered or not);
  "worst seed" is the lowest final held-out accuracy over seeds. Both were added after the first full grid showed
  seeds of some arms collapsing: read them as a description of that grid, to be confirmed with more seeds.
- A difference between two arms counts when |mean difference| > 2 standard errors (seed to seed) and,
  for accuracy, > 0.02; otherwise it is "no difference beyond the seed spread".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alp_agents.lab import LabConfig, is_finished, wall_time  # noqa: E402
from alp_agents.plots import Row, read_metrics  # noqa: E402
from alp_agents.trainers.run_config import TrainConfig  # noqa: E402

_READING = __doc__.split("How the numbers are made (also printed at the top of the report):")[1].strip()

ACCURACY = "eval/avg_at_k"
CLEAN_WIDTH = "mismatch/seq_log_width"
LOSS_WIDTH = "loss_seq/log_width"
NLL = "mismatch/sample_nll"
CLEAN_KL = "mismatch/k3"
MAX_LOG_RATIO = "mismatch/max_abs_log_ratio"
SPIKE_FACTOR = 5.0
DROP = 0.1
ACCURACY_FLOOR = 0.02
NLL_BINS = 4


@dataclass
class Run:
    """One finished (or partial) run of the grid, with its metrics rows."""

    setting: str
    arm: str
    seed: int
    rows: list[Row]
    seconds: float

    def series(self, key: str, *, positive: bool = False) -> list[tuple[int, float]]:
        """(iteration, value) of every row with a finite `key` (only values > 0 with `positive`, for a log axis)."""
        return [(int(row["iteration"]), float(row[key])) for row in self.rows
                if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) and (row[key] > 0 or not positive)]  # fmt: skip

    def last(self, key: str) -> float:
        values = self.series(key)
        return values[-1][1] if values else math.nan


@dataclass
class Summary:
    """Per-seed values of one arm in one setting, summarised."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len([v for v in self.values if math.isfinite(v)])

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.stdev(finite) if len(finite) > 1 else math.nan

    def text(self, digits: int = 3) -> str:
        if not self.n:
            return "-"
        spread = f" ± {self.std:.{digits}f}" if math.isfinite(self.std) else ""
        return f"{self.mean:.{digits}f}{spread}"


def load_runs(lab_dir: Path) -> tuple[LabConfig, list[Run], int]:
    """The lab's config, its finished runs (settings and arms in the config's order, then seeds), and how many are unfinished."""
    cfg = LabConfig.model_validate_json((lab_dir / "lab.json").read_text(encoding="utf-8"))
    runs, unfinished = [], 0
    for metrics in (lab_dir / "runs").glob("*/*/seed*/metrics.jsonl"):
        run_dir = metrics.parent
        if not is_finished(run_dir, TrainConfig.model_validate_json((run_dir / "config.json").read_text(encoding="utf-8"))):
            unfinished += 1
            continue
        runs.append(Run(setting=run_dir.parent.parent.name, arm=run_dir.parent.name, seed=int(run_dir.name.removeprefix("seed")),
                        rows=read_metrics(metrics), seconds=wall_time(run_dir)))
    order = {name: i for i, name in enumerate([*cfg.settings, *cfg.arms])}
    runs.sort(key=lambda run: (order.get(run.setting, len(order)), order.get(run.arm, len(order)), run.arm, run.seed))
    return cfg, runs, unfinished


# -- statistics -------------------------------------------------------------------------------------


def compare(a: Summary, b: Summary, *, floor: float = 0.0) -> tuple[float, float, int]:
    """(mean difference a - b, its standard error, sign): sign is +1/-1 when it exceeds 2 SE and `floor`, else 0."""
    if a.n < 1 or b.n < 1:
        return math.nan, math.nan, 0
    var_a = a.std**2 if a.n > 1 else 0.0
    var_b = b.std**2 if b.n > 1 else 0.0
    difference = a.mean - b.mean
    standard_error = math.sqrt(var_a / a.n + var_b / b.n) if a.n > 1 and b.n > 1 else math.nan  # one seed: no spread to judge by
    significant = abs(difference) > max(2 * standard_error, floor) and a.n > 1 and b.n > 1
    return difference, standard_error, (1 if difference > 0 else -1) if significant else 0


def excess_width(runs: Sequence[Run], key: str) -> dict[tuple[str, int], float]:
    """Per run, the mean of `key` minus the pooled mean of its NLL bin (quartiles over the runs given): width at matched entropy."""
    points = [(run, nll, width) for run in runs for (i, nll), (j, width) in _aligned(run.series(NLL), run.series(key))]
    if len(points) < NLL_BINS:
        return {}
    edges = statistics.quantiles([nll for _, nll, _ in points], n=NLL_BINS)
    bin_of: Callable[[float], int] = lambda nll: sum(nll > edge for edge in edges)  # noqa: E731
    pooled: dict[int, list[float]] = defaultdict(list)
    for _, nll, width in points:
        pooled[bin_of(nll)].append(width)
    bin_mean = {b: statistics.fmean(v) for b, v in pooled.items()}
    excess: dict[tuple[str, int], list[float]] = defaultdict(list)
    for run, nll, width in points:
        excess[(run.arm, run.seed)].append(width - bin_mean[bin_of(nll)])
    return {key_: statistics.fmean(v) for key_, v in excess.items()}


def _aligned(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> list[tuple[tuple[int, float], tuple[int, float]]]:
    other = dict(b)
    return [((i, x), (i, other[i])) for i, x in a if i in other]


def count_drops(accuracies: list[float]) -> int:
    """Evaluations more than DROP below the best evaluation before them."""
    return sum(value < max(accuracies[:i]) - DROP for i, value in enumerate(accuracies) if i > 0)


def spike_counts(runs: Sequence[Run], key: str) -> dict[tuple[str, int], float]:
    """Per run, iterations whose `key` exceeds SPIKE_FACTOR x the median over every iteration of these runs."""
    pooled = [value for run in runs for _, value in run.series(key)]
    if not pooled:
        return {}
    threshold = SPIKE_FACTOR * statistics.median(pooled)
    return {(run.arm, run.seed): float(sum(value > threshold for _, value in run.series(key))) for run in runs}


# -- the report -------------------------------------------------------------------------------------


@dataclass
class SettingTable:
    """Every per-arm summary of one setting."""

    setting: str
    accuracy: dict[str, Summary]
    accuracy_mean: dict[str, Summary]
    of_control: dict[str, Summary]
    clean_excess: dict[str, Summary]
    loss_excess: dict[str, Summary]
    clean_width: dict[str, Summary]
    max_log_ratio: dict[str, Summary]
    kl_spikes: dict[str, Summary]
    drops: dict[str, Summary]
    minutes: dict[str, Summary]


def setting_table(cfg: LabConfig, runs: list[Run], setting: str) -> SettingTable:
    """Summaries per arm of the runs under `setting` (accuracy as a fraction of the same arm under the setting's control)."""
    mine = [run for run in runs if run.setting == setting]
    control = cfg.settings[setting].control
    control_accuracy = {arm: Summary([r.last(ACCURACY) for r in runs if r.setting == control and r.arm == arm]) for arm in cfg.arms}
    clean_excess, loss_excess = excess_width(mine, CLEAN_WIDTH), excess_width(mine, LOSS_WIDTH)
    spikes = spike_counts(mine, CLEAN_KL)

    def per_arm(value: Callable[[Run], float]) -> dict[str, Summary]:
        table: dict[str, Summary] = {}
        for run in mine:
            table.setdefault(run.arm, Summary()).values.append(value(run))
        return table

    def of_control(run: Run) -> float:
        base = control_accuracy.get(run.arm, Summary()).mean
        return run.last(ACCURACY) / base if math.isfinite(base) and base > 0 else math.nan

    return SettingTable(
        setting=setting,
        accuracy=per_arm(lambda r: r.last(ACCURACY)),
        accuracy_mean=per_arm(lambda r: _mean([v for i, v in r.series(ACCURACY) if i > 0])),
        of_control=per_arm(of_control),
        clean_excess=per_arm(lambda r: clean_excess.get((r.arm, r.seed), math.nan)),
        loss_excess=per_arm(lambda r: loss_excess.get((r.arm, r.seed), math.nan)),
        clean_width=per_arm(lambda r: _mean([v for _, v in r.series(CLEAN_WIDTH)])),
        max_log_ratio=per_arm(lambda r: max([v for _, v in r.series(MAX_LOG_RATIO)], default=math.nan)),
        kl_spikes=per_arm(lambda r: spikes.get((r.arm, r.seed), math.nan)),
        drops=per_arm(lambda r: float(count_drops([v for _, v in r.series(ACCURACY)]))),
        minutes=per_arm(lambda r: r.seconds / 60),
    )


def markdown_table(table: SettingTable, has_control: bool) -> str:
    """The setting's table: one row per arm, mean ± std over seeds in every cell."""
    header = ["arm", "seeds", "held-out acc", "worst seed", "held-out mean", "drops", "of own control" if has_control else None, "clean env. ln(P98/P2)",
              "clean env. excess at matched NLL", "loss env. excess at matched NLL", "max clean abs log r",
              "KL-spike iters", "minutes / run"]  # fmt: skip
    header = [h for h in header if h is not None]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for arm, accuracy in table.accuracy.items():
        cells = [arm, str(accuracy.n), accuracy.text(), f"{min(accuracy.values):.3f}", table.accuracy_mean[arm].text(),
                 table.drops[arm].text(1), table.of_control[arm].text(2) if has_control else None,
                 table.clean_width[arm].text(2), table.clean_excess[arm].text(2), table.loss_excess[arm].text(2),
                 table.max_log_ratio[arm].text(2), table.kl_spikes[arm].text(1), table.minutes[arm].text(1)]  # fmt: skip
        lines.append("| " + " | ".join(c for c in cells if c is not None) + " |")
    return "\n".join(lines)


def verdict_line(claim: str, a: str, b: str, summaries: dict[str, Summary], *, lower_is_better: bool, floor: float = 0.0,
                 digits: int = 3) -> tuple[str, int]:
    """One comparison as a sentence, and +1 (a better), -1 (a worse), 0 (no difference) or None-like 2 (missing)."""
    if a not in summaries or b not in summaries:
        return f"- {claim}: {a} vs {b}: not run", 2
    difference, standard_error, sign = compare(summaries[a], summaries[b], floor=floor)
    better = -sign if lower_is_better else sign
    word = {1: f"{a} better", -1: f"{a} worse", 0: "no difference beyond the seed spread"}[better]
    return (f"- {claim}: {a} {summaries[a].text(digits)} vs {b} {summaries[b].text(digits)} "
            f"(difference {difference:+.{digits}f} ± {standard_error:.{digits}f} SE): **{word}**"), better


def verdict(outcomes: list[int]) -> str:
    """reproduced if every comparison favours ALP, not reproduced if one goes against it, else inconclusive."""
    ran = [o for o in outcomes if o != 2]
    if not ran:
        return "not tested (arms missing)"
    if all(o == 1 for o in ran):
        return "reproduced"
    if any(o == -1 for o in ran):
        return "not reproduced"
    return "inconclusive at this scale"


def informative_line(table: SettingTable, control_table: SettingTable) -> str:
    """Whether the mismatch costs Bypass more than the seed spread against its own control (else no correction can help)."""
    mine, theirs = table.accuracy.get("bypass"), control_table.accuracy.get("bypass")
    if mine is None or theirs is None:
        return "- **Informative?** not tested: bypass must run under the mismatch and on its control"
    difference, standard_error, sign = compare(mine, theirs, floor=ACCURACY_FLOOR)
    answer = ("yes: the mismatch costs bypass more than the seed spread" if sign == -1 else
              "no: the mismatch does not cost bypass beyond the seed spread, so no correction can show a gain in accuracy here")
    return (f"- **Informative?** bypass {mine.text()} under `{table.setting}` vs {theirs.text()} on `{control_table.setting}` "
            f"(difference {difference:+.3f} ± {standard_error:.3f} SE): {answer}")


SIGMA_RULE_ARMS = ("alp", "alp_calibrated", "alp_relative_1pct", "alp_mis")
"""The ALP variants that differ in how much noise they add (or in what they reject), compared with MIS."""


def claims_section(table: SettingTable, control_table: SettingTable | None) -> list[str]:
    """Markdown lines: whether the setting is informative, then each claim's verdict with the comparisons behind it."""
    lines = [f"### Verdicts under `{table.setting}`", ""]
    if control_table is not None:
        lines += [informative_line(table, control_table), ""]
    claims = [
        ("1. ALP keeps the importance-ratio tails narrow", [("clean envelope at matched entropy", "bypass", table.clean_excess, True, 0.0),
                                                           ("clean envelope at matched entropy", "mis", table.clean_excess, True, 0.0),
                                                           ("loss envelope at matched entropy", "bypass", table.loss_excess, True, 0.0)]),
        ("2. ALP dampens KL spikes", [("KL-spike iterations", "bypass", table.kl_spikes, True, 0.0),
                                      ("max clean abs log r", "bypass", table.max_log_ratio, True, 0.0)]),
        ("3. ALP learns better than Bypass and MIS/TIS", [("held-out accuracy", other, table.accuracy, False, ACCURACY_FLOOR)
                                                          for other in ("bypass", "mis", "tis")]),
        ("4. all-layer noise beats partial noise", [("held-out accuracy", other, table.accuracy, False, ACCURACY_FLOOR)
                                                    for other in ("alp_early", "alp_middle", "alp_late", "alp_logits")]),
    ]
    for title, comparisons in claims:
        outcomes, body = [], []
        for what, other, summaries, lower_is_better, floor in comparisons:
            line, outcome = verdict_line(what, "alp", other, summaries, lower_is_better=lower_is_better, floor=floor)
            body.append(line)
            outcomes.append(outcome)
        lines += [f"**{title}: {verdict(outcomes)}**", *body, ""]
    variants = [verdict_line("held-out accuracy", arm, "mis", table.accuracy, lower_is_better=False, floor=ACCURACY_FLOOR)[0]
                for arm in SIGMA_RULE_ARMS if arm in table.accuracy]  # fmt: skip
    if variants:
        lines += ["**Beyond the paper: does some ALP variant match MIS?**", *variants, ""]
    return lines


def write_report(lab_dir: str | Path) -> Path:
    """Write LAB_DIR/report.md and LAB_DIR/figures/*.png; return the report's path."""
    lab_dir = Path(lab_dir)
    cfg, runs, unfinished = load_runs(lab_dir)
    figures = lab_dir / "figures"
    figures.mkdir(exist_ok=True)
    seeds = sorted({run.seed for run in runs})
    total_minutes = sum(run.seconds for run in runs) / 60
    lines = ["# Mismatch lab report", "",
             f"{len(runs)} finished runs ({unfinished} unfinished left out): settings {', '.join(dict.fromkeys(r.setting for r in runs))}; seeds {seeds}; "
             f"{total_minutes:.0f} minutes of runs. Regenerate: `alp lab --out {lab_dir}` (resumes, reruns nothing finished), "
             f"then `alp lab report {lab_dir}`.", "",
             "How the numbers are made:", "", _READING, ""]  # fmt: skip
    tables = {setting: setting_table(cfg, runs, setting) for setting in cfg.settings if any(r.setting == setting for r in runs)}
    for setting, table in tables.items():
        control = cfg.settings[setting].control
        lines += [f"## Setting `{setting}`: {', '.join(f'`{o}`' for o in cfg.settings[setting].set) or 'the recipe as it is'}"
                  + (f" (control: `{control}`)" if control else ""), "",
                  markdown_table(table, has_control=control is not None), ""]  # fmt: skip
        if control is not None:
            lines += claims_section(table, tables.get(control))
        for name in plot_setting(runs, setting, figures):
            lines.append(f"![{name.stem}](figures/{name.name})")
        lines.append("")
    path = lab_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- figures ----------------------------------------------------------------------------------------


def plot_setting(runs: list[Run], setting: str, out: Path) -> list[Path]:
    """The setting's figures in `out`: accuracy, clean envelope, KL (vs iteration), envelope vs entropy, sigma."""
    mine = [run for run in runs if run.setting == setting]
    arms = list(dict.fromkeys(run.arm for run in mine))
    paths = [
        _band_plot(mine, arms, ACCURACY, f"{setting}: held-out accuracy (mean, band = min..max over seeds)", out / f"{setting}_heldout.png"),
        _band_plot(mine, arms, CLEAN_WIDTH, f"{setting}: clean sequence envelope ln(P98/P2) of pi/mu", out / f"{setting}_envelope.png"),
        _band_plot(mine, arms, CLEAN_KL, f"{setting}: clean KL k3 (trainer vs engine)", out / f"{setting}_kl.png", log_y=True),
        _scatter_plot(mine, arms, NLL, CLEAN_WIDTH, f"{setting}: clean envelope vs entropy (sample NLL)", out / f"{setting}_envelope_vs_nll.png"),
        _sigma_plot(mine, f"{setting}: sigma per layer (ALP arms, seed mean)", out / f"{setting}_sigma.png"),
    ]
    return [p for p in paths if p is not None]


def _across_seeds(runs: list[Run], arm: str, key: str, *, positive: bool = False) -> dict[int, list[float]]:
    """iteration -> the values of `key` in every run of `arm` (one per seed that logged it)."""
    by_iteration: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        if run.arm == arm:
            for iteration, value in run.series(key, positive=positive):
                by_iteration[iteration].append(value)
    return by_iteration


def _band_plot(runs: list[Run], arms: list[str], key: str, title: str, path: Path, *, log_y: bool = False) -> Path | None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, arm in enumerate(arms):
        by_iteration = _across_seeds(runs, arm, key, positive=log_y)
        if not by_iteration:
            continue
        x = sorted(by_iteration)
        ax.plot(x, [statistics.fmean(by_iteration[j]) for j in x], color=f"C{i % 10}", label=arm, marker="." if len(x) < 20 else None,
                linestyle="-" if i < 10 else "--")  # ten colours, then dashed
        ax.fill_between(x, [min(by_iteration[j]) for j in x], [max(by_iteration[j]) for j in x], color=f"C{i % 10}", alpha=0.15)
        drawn = True
    return _finish(fig, ax, title, "iteration", key, path, drawn, log_y=log_y)


def _scatter_plot(runs: list[Run], arms: list[str], x_key: str, y_key: str, title: str, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, arm in enumerate(arms):
        points = [(x, y) for run in runs if run.arm == arm for (_, x), (_, y) in _aligned(run.series(x_key), run.series(y_key))]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=8, alpha=0.5, color=f"C{i % 10}", label=arm)
            drawn = True
    return _finish(fig, ax, title, x_key, y_key, path, drawn)


def _sigma_plot(runs: list[Run], title: str, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, arm in enumerate(dict.fromkeys(run.arm for run in runs)):
        keys = sorted({k for run in runs if run.arm == arm for row in run.rows for k in row
                       if k.startswith("sigma/") and k not in ("sigma/min", "sigma/mean", "sigma/max")})  # fmt: skip
        for key in keys:
            by_iteration = _across_seeds(runs, arm, key, positive=True)
            if by_iteration:
                x = sorted(by_iteration)
                ax.plot(x, [statistics.fmean(by_iteration[j]) for j in x], color=f"C{i % 10}", alpha=0.8,
                        label=f"{arm} {key.removeprefix('sigma/')}")
                drawn = True
    return _finish(fig, ax, title, "iteration", "sigma", path, drawn, log_y=True)


def _finish(fig: plt.Figure, ax: plt.Axes, title: str, xlabel: str, ylabel: str, path: Path, drawn: bool, *, log_y: bool = False) -> Path | None:
    if not drawn:
        plt.close(fig)
        return None
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan
