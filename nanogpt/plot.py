"""Plots of a run or a sweep, drawn from metrics.jsonl:

    python -m nanogpt.plot outputs/2026-11-25/10-00-00    # loss.png, lr.png (tasks.png) in the run folder
    python -m nanogpt.plot multirun/2026-11-25/11-02-13   # val_loss.png (tasks.png, cells.png): every job's
    python -m nanogpt.plot multirun/A multirun/B --x optim.learning_rate --by model.n_embd --out lr.png
                                # final val loss against a swept key, a line per value of another, a panel per sweep

A mixture's val loss per source (data=mix) is drawn beside the run's, and a sweep of mixtures
gets val_loss_sources.png: a panel per source, a line per job.

Figures are built with matplotlib's object API (Figure, no pyplot): no global state, no display
needed (PNGs are rendered by Agg), and the functions return the figures so tests can read the
plotted data back.
"""

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nanogpt import stats
from nanogpt.cells import Cell, group
from nanogpt.errors import UserError
from nanogpt.rundir import METRICS, read_metrics, source_losses, task_scores
from nanogpt.runs import overrides
from nanogpt.sweep import summarize

X_LABELS = {"iter": "iteration", "tokens": "tokens"}


def run_figures(run_dir: Path) -> dict[str, Figure]:
    """'loss': train and val loss against iterations (left) and tokens (right); 'lr': the schedule;
    'tasks': the eval group's scores, when the run recorded some."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    run_overrides = overrides(run_dir)

    loss = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, x in zip(loss.subplots(1, 2, sharey=True), X_LABELS):
        _line(ax, train, x, "loss", "train loss (batch)", alpha=0.5)
        _line(ax, evals, x, "train_loss", "train loss (eval)", marker="o")
        _line(ax, evals, x, "val_loss", "val loss", marker="o")
        for key in dict.fromkeys(k for r in evals for k in source_losses(r)):  # a mixture's sources
            _line(ax, evals, x, key, key.replace("val_loss/", "val loss: "), marker=".", linestyle="--")
        _style(ax, x, "loss")
    loss.axes[0].legend()
    _title(loss, run_dir, run_overrides)

    lr = Figure(figsize=(6, 4), layout="constrained")
    ax = lr.subplots()
    _line(ax, train, "iter", "lr", "learning rate")
    _style(ax, "iter", "learning rate")
    _title(lr, run_dir, run_overrides)
    figures = {"loss": loss, "lr": lr}
    tasks = [r for r in records if r.get("kind") == "tasks"]
    if tasks:
        figures["tasks"] = scores_figure({"": tasks}, run_dir, run_overrides)
    return figures


def scores_figure(curves: dict[str, list[dict]], folder: Path, title_overrides: list[str],
                  scores: Callable[[dict], dict] = task_scores) -> Figure:
    """One panel per score of the records against iterations (the tasks records', or what
    `scores` picks), a line per curve (label -> records: a run's, or each job's of a sweep)."""
    names = list(dict.fromkeys(k for records in curves.values() for r in records for k in scores(r)))
    cols = min(len(names), 4)  # CORE alone has 23 scores: rows of four panels
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.5 * cols, 4 * rows), layout="constrained")
    for ax, name in zip(fig.subplots(rows, cols, squeeze=False).flat, names):
        for label, records in curves.items():
            _line(ax, records, "iter", name, label, marker="o")
        _style(ax, "iter", name)
    for ax in fig.axes[len(names) :]:
        ax.set_visible(False)
    if len(curves) > 1:
        fig.axes[0].legend(fontsize="small")
    _title(fig, folder, title_overrides)
    return fig


def sweep_figures(sweep_dir: Path, over: list[str] | None = None) -> dict[str, Figure]:
    """'val_loss': every job's val loss against iterations (left) and tokens (right), one line per
    job, labelled with the overrides that differ between jobs (the shared ones go in the title);
    'tasks': every job's task scores, when the jobs recorded some; 'cells': when jobs differ only
    in their seed (or the keys `over` names), each cell's mean with its 95% interval."""
    jobs = sweep_jobs(sweep_dir)
    job_overrides = {job: overrides(job) for job in jobs}
    common = set.intersection(*(set(o) for o in job_overrides.values())) if len(jobs) > 1 else set()
    labels = {job: " ".join([f"{job.relative_to(sweep_dir)}:", *(o for o in job_overrides[job] if o not in common)])
              for job in jobs}
    records = {job: read_metrics(job) for job in jobs}
    shared = [o for o in job_overrides[jobs[0]] if o in common] if jobs else []
    fig = Figure(figsize=(12, 5), layout="constrained")
    for ax, x in zip(fig.subplots(1, 2, sharey=True), X_LABELS):
        for job in jobs:
            _line(ax, [r for r in records[job] if r.get("kind") == "eval"], x, "val_loss", labels[job], marker="o")
        _style(ax, x, "val loss")
    fig.axes[0].legend(fontsize="small")
    _title(fig, Path(sweep_dir), shared)
    figures = {"val_loss": fig}
    evals = {labels[job]: [r for r in records[job] if r.get("kind") == "eval"] for job in jobs}
    if any(source_losses(r) for curve in evals.values() for r in curve):  # each source of a mixture: a panel
        figures["val_loss_sources"] = scores_figure(evals, Path(sweep_dir), shared, source_losses)
    tasks = {labels[job]: [r for r in records[job] if r.get("kind") == "tasks"] for job in jobs}
    if any(tasks.values()):
        figures["tasks"] = scores_figure(tasks, Path(sweep_dir), shared)
    cells = group(summarize(Path(sweep_dir)), over)
    if any(len(c.runs) > 1 for c in cells):
        figures["cells"] = cells_figure(cells, Path(sweep_dir))
    return figures


def cells_figure(cells: list[Cell], folder: Path) -> Figure:
    """Left: each cell's mean val loss against iterations with a band for its 95% interval (at
    the iterations all its runs evaluated); right: each cell's final val loss, mean and interval."""
    shared = set.intersection(*(set(c.overrides) for c in cells))
    labels = [" ".join(o for o in c.overrides if o not in shared) or "(no other overrides)" for c in cells]
    fig = Figure(figsize=(12, max(4.5, 2 + 0.4 * len(cells))), layout="constrained")
    curves, finals = fig.subplots(1, 2)
    colors = {}
    for cell, label in zip(cells, labels):
        evals = [{e["iter"]: e["val_loss"] for e in run["evals"]} for run in cell.runs]
        iters = sorted(set.intersection(*(set(e) for e in evals))) if evals else []
        points = [stats.estimate([e[it] for e in evals]) for it in iters]
        (line,) = curves.plot(iters, [p.mean for p in points], marker="o", label=f"{label} (n={len(cell.runs)})")
        colors[label] = line.get_color()
        if len(cell.runs) > 1:
            curves.fill_between(iters, [p.ci_low for p in points], [p.ci_high for p in points], color=colors[label], alpha=0.2)
    _style(curves, "iter", "val loss (mean, 95% interval)")
    curves.legend(fontsize="small")
    for y, (cell, label) in enumerate(zip(cells, labels)):
        e = stats.estimate([r["final_val_loss"] for r in cell.runs if r["final_val_loss"] is not None])
        if e.mean is not None:
            xerr = None if e.ci_low is None else [[e.mean - e.ci_low], [e.ci_high - e.mean]]
            finals.errorbar([e.mean], [y], xerr=xerr, fmt="o", capsize=4, color=colors[label])
    finals.set_yticks(range(len(cells)), labels, fontsize="small")
    finals.set_ylim(-0.7, len(cells) - 0.3)
    finals.set_xlabel("final val loss (mean, 95% interval)")
    finals.grid(alpha=0.3)
    _title(fig, folder, [o for o in cells[0].overrides if o in shared])
    return fig


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those with a metrics.jsonl), in job order: 2 before 10."""
    jobs = [p.parent for p in Path(sweep_dir).glob(f"**/{METRICS}")]
    return sorted(jobs, key=lambda p: [s.zfill(9) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts])


def plot(folder: Path, over: list[str] | None = None) -> list[Path]:
    """Write the PNGs of a run or sweep folder into it; return their paths. `over`: the keys a
    sweep's cells vary in (default: system.seed)."""
    folder = Path(folder)
    if (folder / METRICS).exists():
        figures = run_figures(folder)
    elif sweep_jobs(folder):
        figures = sweep_figures(folder, over)
    else:
        raise UserError(f"{folder}: no {METRICS} in it or in folders below it: not a run or sweep folder")
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / f"{name}.png", dpi=110)
        paths.append(folder / f"{name}.png")
    return paths


def swept_figure(sweeps: list[Path], x: str, by: str, metric: str = "final_val_loss") -> tuple[Figure, list[str]]:
    """A panel per sweep: its jobs' metric against the swept key x (log scale), a line per value
    of `by`, each line's best point ringed; and a line of text per curve naming its best x."""
    fig = Figure(figsize=(5.5 * len(sweeps), 4.2), layout="constrained")
    axes, lines = fig.subplots(1, len(sweeps), sharey=True, squeeze=False)[0], []
    for ax, sweep in zip(axes, sweeps):
        curves: dict[float, list[tuple[float, float]]] = {}
        for row in summarize(Path(sweep)):
            values = dict(o.split("=", 1) for o in row["overrides"] if "=" in o)
            if row.get(metric) is not None and x in values and by in values:
                curves.setdefault(float(values[by]), []).append((float(values[x]), float(row[metric])))
        for value, points in sorted(curves.items()):
            points.sort()
            best = min(points, key=lambda p: p[1])
            line = ax.plot(*zip(*points), marker="o", label=f"{by}={value:g}")[0]
            ax.plot(*best, marker="o", ms=12, mfc="none", color=line.get_color())
            lines.append(f"{sweep}: {by}={value:g}: best {x}={best[0]:g} ({metric} {best[1]:.4f})")
        ax.set(xscale="log", xlabel=x, title=Path(sweep).name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(metric.replace("_", " "))
    return fig, lines


def _line(ax: Axes, records: list[dict], x: str, y: str, label: str, **style) -> None:
    points = [(r[x], r[y]) for r in records if x in r and y in r]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, **style)


def _style(ax: Axes, x: str, ylabel: str) -> None:
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _title(fig: Figure, folder: Path, overrides: list[str]) -> None:
    """The folder and overrides, wrapped to the figure's width (about 13 small characters an inch)."""
    text = textwrap.fill(" ".join([str(folder), *overrides]), int(fig.get_figwidth() * 13))
    fig.suptitle(text, fontsize="small")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or sweep (multirun) folders")
    parser.add_argument("--over", help="the keys a sweep's cells vary in, comma-separated (default: system.seed)")
    parser.add_argument("--x", help="sweeps' final val loss against this swept key (with --by and --out)")
    parser.add_argument("--by", help="with --x: a line per value of this key")
    parser.add_argument("--out", type=Path, help="with --x: the PNG to write")
    args = parser.parse_args(argv)
    if args.x:
        if not (args.by and args.out):
            parser.error("--x needs --by and --out")
        fig, lines = swept_figure(args.folders, args.x, args.by)
        fig.savefig(args.out, dpi=110)
        print("\n".join([*lines, str(args.out)]))
        return
    for folder in args.folders:
        try:
            paths = plot(folder, args.over.split(",") if args.over else None)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
