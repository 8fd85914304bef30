"""Learning curves of `mb2po-train` workdirs, from their metrics.jsonl: `mb2po-plot WORKDIR... --out FILE.png`.

Three panels, one colour per workdir:
  - normalised score against training progress: AWAC's gradient steps, then each MB2PO iteration's
    `updates_per_iteration` AWAC updates, on one axis, with a vertical line where MB2PO starts; the mean
    over seeds and the min-max band;
  - the dynamics ensemble's holdout MSE (mean over members) against its gradient steps;
  - MB2PO's rollouts: mean penalty lambda * u (solid) and mean uncertainty u (dashed) per iteration.
Needs matplotlib (`pip install -e ".[plot]"`). `experiments/benchmark.py report` draws its per-dataset
curves with `score_series` and `draw_band` too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from mb2po_jax.errors import ConfigError, Mb2poError, WorkdirError
from mb2po_jax.logger import json_lines

SCORE_TITLE = "normalised score"
DYNAMICS_TITLE = "dynamics: holdout MSE"
MB2PO_TITLE = "MB2PO rollouts: penalty and uncertainty"


@dataclasses.dataclass
class Series:
    """A curve over seeds: xs [T], and per x the values of every seed (NaN where a seed has none)."""

    xs: list[float]
    values: list[list[float]]

    def __bool__(self) -> bool:
        return bool(self.xs)


def _floats(value: Any) -> list[float]:
    """A metric's per-seed values (lists over seeds; null is NaN)."""
    items = value if isinstance(value, list) else [value]
    return [math.nan if v is None else float(v) for v in items]


def read_records(workdir: str) -> list[dict]:
    """metrics.jsonl's records; a line that does not parse (the end of a file being written) is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        what = "no such directory" if not os.path.isdir(workdir) else "no metrics.jsonl (nothing trained yet?)"
        raise WorkdirError(f"{workdir}: {what}")
    with open(path, encoding="utf-8") as f:
        return [record for _, record in json_lines(f) if "stage" in record and "step" in record]


def read_settings(workdir: str) -> dict:
    """The run's configuration (config.json's "config", else results.json's), {} when neither is there."""
    for name in ("config.json", "results.json"):
        try:
            with open(os.path.join(workdir, name), encoding="utf-8") as f:
                config = json.load(f).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return config
    return {}


def evaluations(records: list[dict]) -> list[dict]:
    """The evaluation records (with normalized_score), the last one of each (stage, step), in order."""
    found = {(r["stage"], r["step"]): r for r in records if "normalized_score" in r}
    order = {"awac": 0, "mb2po": 1}
    return [found[k] for k in sorted(found, key=lambda k: (order.get(k[0], 2), k[1]))]


def stage_boundary(evals: list[dict], settings: dict) -> tuple[int, int]:
    """(AWAC steps, AWAC updates per MB2PO iteration): where MB2PO starts on the progress axis, and its unit."""
    awac_steps = settings.get("awac_steps") or max([e["step"] for e in evals if e["stage"] == "awac"] or [0])
    per_iteration = (settings.get("mb2po") or {}).get("updates_per_iteration") or 1000
    return int(awac_steps), int(per_iteration)


def score_series(evals: list[dict], awac_steps: int, per_iteration: int) -> dict[str, Series]:
    """Normalised scores per stage on one progress axis: AWAC step s at x = s, MB2PO iteration i at
    x = awac_steps + i * per_iteration. MB2PO's curve starts at AWAC's final evaluation (its start policy)."""
    series = {"awac": Series([], []), "mb2po": Series([], [])}
    for e in evals:
        if e["stage"] in series:
            x = e["step"] if e["stage"] == "awac" else awac_steps + e["step"] * per_iteration
            series[e["stage"]].xs.append(float(x))
            series[e["stage"]].values.append(_floats(e["normalized_score"]))
    awac, mb2po = series["awac"], series["mb2po"]
    if mb2po and awac and awac.xs[-1] == awac_steps:
        mb2po.xs.insert(0, awac.xs[-1])
        mb2po.values.insert(0, awac.values[-1])
    return series


def metric_series(records: list[dict], stage: str, key: str) -> Series:
    """A training metric of `stage` against its step, one value per seed (a per-member metric such as the
    dynamics holdout MSE [S, members] is averaged over the members)."""
    xs, values = [], []
    for r in records:
        if r["stage"] != stage or key not in r or "normalized_score" in r:
            continue
        per_seed = [sum(members) / len(members)
                    for members in map(_floats, r[key] if isinstance(r[key], list) else [r[key]])]
        xs.append(float(r["step"]))
        values.append(per_seed)
    return Series(xs, values)


def draw_band(ax, series: Series, color: str, label: str | None, band_label: str | None = None,
              **line_kwargs) -> None:
    """The mean over seeds as a line, and the min-max over seeds as a band where there are several."""
    def finite(vs):
        return [v for v in vs if math.isfinite(v)] or [math.nan]

    means = [sum(finite(v)) / len(finite(v)) for v in series.values]
    ax.plot(series.xs, means, color=color, label=label, **line_kwargs)
    if any(len(v) > 1 for v in series.values):
        ax.fill_between(series.xs, [min(finite(v)) for v in series.values], [max(finite(v)) for v in series.values],
                        color=color, alpha=0.2, linewidth=0, label=band_label)


def _labels(workdirs: list[str]) -> list[str]:
    """Each workdir's name, with as many parent directories as make them distinct."""
    parts = [os.path.abspath(w).rstrip(os.sep).split(os.sep) for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(w) for w in workdirs]


def make_figure(workdirs: list[str]):
    """The three-panel figure of `workdirs` (a matplotlib Figure, no pyplot state). Raises WorkdirError for
    a workdir without metrics.jsonl and ConfigError when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("mb2po-plot needs matplotlib, which is not installed: pip install -e \".[plot]\"") from None
    runs = [(label, read_records(w), read_settings(w)) for label, w in zip(_labels(workdirs), workdirs)]

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(1.3, 1))
    score_ax, dyn_ax, mb_ax = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    boundaries, units, drawn = set(), set(), {"score": False, "dyn": False, "mb": False}
    for i, (label, records, settings) in enumerate(runs):
        color = f"C{i % 10}"
        evals = evaluations(records)
        awac_steps, per_iteration = stage_boundary(evals, settings)
        series = score_series(evals, awac_steps, per_iteration)
        for stage in ("awac", "mb2po"):
            if series[stage]:  # one legend entry per workdir
                draw_band(score_ax, series[stage], color, label if stage == "awac" or not series["awac"] else None,
                          marker="o", markersize=3)
                drawn["score"] = True
        if series["mb2po"] or "mb2po" in settings.get("stages", ()):
            boundaries.add(awac_steps)
            units.add(per_iteration)
        holdout = metric_series(records, "dynamics", "holdout_mse")
        if holdout:
            draw_band(dyn_ax, holdout, color, label)
            drawn["dyn"] = True
        for key, style, name in (("rollout_mean_penalty", "-", "penalty"),
                                 ("rollout_mean_uncertainty", "--", "uncertainty")):
            curve = metric_series(records, "mb2po", key)
            if curve:
                draw_band(mb_ax, curve, color, f"{label}: {name}", linestyle=style)
                drawn["mb"] = True
    for x in sorted(boundaries):
        score_ax.axvline(x, color="0.3", linestyle="--", linewidth=1)
        score_ax.annotate("MB2PO starts", (x, 1), xycoords=("data", "axes fraction"), xytext=(4, -4),
                          textcoords="offset points", ha="left", va="top", fontsize=8, color="0.3")
    unit = f"{units.pop():,} updates each" if len(units) == 1 else "updates_per_iteration each"
    score_ax.set_title(SCORE_TITLE)
    score_ax.set_xlabel(f"training progress in gradient steps: AWAC steps, then MB2PO iterations ({unit})")
    score_ax.set_ylabel("D4RL-normalised score (mean, min-max over seeds)")
    dyn_ax.set_title(DYNAMICS_TITLE)
    dyn_ax.set_xlabel("ensemble gradient steps")
    dyn_ax.set_ylabel("holdout MSE (mean over members)")
    mb_ax.set_title(MB2PO_TITLE)
    mb_ax.set_xlabel("MB2PO iteration")
    mb_ax.set_ylabel("penalty lambda*u (solid), u (dashed)")
    for ax, key, what in ((score_ax, "score", "evaluations"), (dyn_ax, "dyn", "dynamics records"),
                          (mb_ax, "mb", "MB2PO records")):
        if drawn[key]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {what}", transform=ax.transAxes, ha="center", va="center", color="0.5")
    if drawn["score"]:
        score_ax.set_xlim(left=0)
    if drawn["dyn"]:
        dyn_ax.set_yscale("log")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mb2po-plot", description="Learning curves of mb2po-train workdirs (normalised score over AWAC "
                                       "then MB2PO, dynamics holdout MSE, MB2PO penalty) into one image.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="mb2po-train workdirs, one line each")
    parser.add_argument("--out", required=True, help="image file to write (.png; any format matplotlib knows)")
    args = parser.parse_args(argv)
    try:
        fig = make_figure(args.workdirs)
        directory = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(directory):
            raise ConfigError(f"--out {args.out}: directory {directory} does not exist")
        fig.savefig(args.out, dpi=110)
    except Mb2poError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
