"""Plots of a run or a sweep, drawn from metrics.jsonl:

    python -m nanogpt.plot outputs/2026-11-25/10-00-00    # loss.png, lr.png (tasks.png) in the run folder
    python -m nanogpt.plot multirun/2026-11-25/11-02-13   # val_loss.png (tasks.png): every job's

Figures are built with matplotlib's object API (Figure, no pyplot): no global state, no display
needed (PNGs are rendered by Agg), and the functions return the figures so tests can read the
plotted data back.
"""

import argparse
import sys
import textwrap
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nanogpt.rundir import METRICS, read_metrics, task_scores
from nanogpt.runs import overrides

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


def scores_figure(curves: dict[str, list[dict]], folder: Path, title_overrides: list[str]) -> Figure:
    """One panel per score of the tasks records against iterations, a line per curve (label ->
    records: a run's, or each job's of a sweep)."""
    names = list(dict.fromkeys(k for records in curves.values() for r in records for k in task_scores(r)))
    fig = Figure(figsize=(4.5 * len(names), 4), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        for label, records in curves.items():
            _line(ax, records, "iter", name, label, marker="o")
        _style(ax, "iter", name)
    if len(curves) > 1:
        fig.axes[0].legend(fontsize="small")
    _title(fig, folder, title_overrides)
    return fig


def sweep_figures(sweep_dir: Path) -> dict[str, Figure]:
    """'val_loss': every job's val loss against iterations (left) and tokens (right), one line per
    job, labelled with the overrides that differ between jobs (the shared ones go in the title);
    'tasks': every job's task scores, when the jobs recorded some."""
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
    tasks = {labels[job]: [r for r in records[job] if r.get("kind") == "tasks"] for job in jobs}
    if any(tasks.values()):
        figures["tasks"] = scores_figure(tasks, Path(sweep_dir), shared)
    return figures


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those with a metrics.jsonl), in job order: 2 before 10."""
    jobs = [p.parent for p in Path(sweep_dir).glob(f"**/{METRICS}")]
    return sorted(jobs, key=lambda p: [s.zfill(9) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts])


def plot(folder: Path) -> list[Path]:
    """Write the PNGs of a run or sweep folder into it; return their paths."""
    folder = Path(folder)
    if (folder / METRICS).exists():
        figures = run_figures(folder)
    elif sweep_jobs(folder):
        figures = sweep_figures(folder)
    else:
        raise FileNotFoundError(f"{folder}: no {METRICS} in it or in folders below it: not a run or sweep folder")
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / f"{name}.png", dpi=110)
        paths.append(folder / f"{name}.png")
    return paths


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
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            paths = plot(folder)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
