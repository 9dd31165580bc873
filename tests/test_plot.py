"""Plots of a real sweep (2 learning rates x 3 seeds, conftest's seeded_sweep) and of one of its
runs: the PNGs exist and the plotted lines are the values of the runs' metrics.jsonl, the cells'
bands and error bars their 95% intervals computed here with scipy."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sp

from conftest import ROOT
from nanogpt.plot import run_figures, swept_figure, sweep_figures
from nanogpt.rundir import read_metrics
from nanogpt.runs import overrides

PNG = b"\x89PNG\r\n\x1a\n"
JOBS = {"0": "0.001 system.seed=1", "1": "0.001 system.seed=2", "2": "0.001 system.seed=3",  # Hydra's job order
        "3": "0.002 system.seed=1", "4": "0.002 system.seed=2", "5": "0.002 system.seed=3"}


@pytest.fixture(scope="module")
def sweep(seeded_sweep):
    return seeded_sweep[0]


def lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def plot_command(folder):
    return subprocess.run([sys.executable, "-m", "nanogpt.plot", str(folder)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_run_plots_show_the_metrics_values(sweep):
    run = sweep / "0"
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figures = run_figures(run)

    by_iter, by_tokens = figures["loss"].axes
    for ax, x in ((by_iter, "iter"), (by_tokens, "tokens")):
        plotted = lines(ax)
        assert plotted["train loss (batch)"] == ([r[x] for r in train], [r["loss"] for r in train])
        assert plotted["train loss (eval)"] == ([r[x] for r in evals], [r["train_loss"] for r in evals])
        assert plotted["val loss"] == ([r[x] for r in evals], [r["val_loss"] for r in evals])
    (lr_ax,) = figures["lr"].axes
    assert lines(lr_ax)["learning rate"] == ([r["iter"] for r in train], [r["lr"] for r in train])
    tasks = [r for r in records if r["kind"] == "tasks"]
    (bpb_ax,) = figures["tasks"].axes
    assert [r["iter"] for r in tasks] == [10, 20]
    assert list(lines(bpb_ax).values()) == [([10, 20], [r["bpb"] for r in tasks])]

    proc = plot_command(run)
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "lr.png", "tasks.png"):
        assert str(run / name) in proc.stdout
        assert (run / name).read_bytes().startswith(PNG)


@pytest.mark.slow
def test_sweep_plot_shows_every_jobs_val_loss_labelled_by_its_overrides(sweep):
    figures = sweep_figures(sweep)
    by_iter, by_tokens = figures["val_loss"].axes
    for ax, x in ((by_iter, "iter"), (by_tokens, "tokens")):
        plotted = lines(ax)
        assert len(plotted) == 6
        for job, swept in JOBS.items():  # Hydra records a swept value as it parsed it
            evals = [r for r in read_metrics(sweep / job) if r["kind"] == "eval"]
            # only what differs between the jobs: the shared overrides are in the title
            assert plotted[f"{job}: optim.learning_rate={swept}"] == ([r[x] for r in evals], [r["val_loss"] for r in evals])
    assert [t.get_text() for t in by_iter.get_legend().get_texts()] == list(lines(by_iter))
    bpb = lines(figures["tasks"].axes[0])
    for job, swept in JOBS.items():
        tasks = [r for r in read_metrics(sweep / job) if r["kind"] == "tasks"]
        assert bpb[f"{job}: optim.learning_rate={swept}"] == ([10, 20], [r["bpb"] for r in tasks])

    proc = plot_command(sweep)
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "val_loss.png").read_bytes().startswith(PNG)
    assert (sweep / "tasks.png").read_bytes().startswith(PNG)
    assert (sweep / "cells.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_sweep_plot_shows_each_cells_mean_and_interval(sweep):
    figure = sweep_figures(sweep)["cells"]
    curves, finals = figure.axes
    bands = {line.get_label(): band for line, band in zip(curves.lines, curves.collections)}
    cells = [t.get_text() for t in finals.get_yticklabels()]  # an error bar per cell, at y = 0, 1, ...
    assert sorted(cells) == ["optim.learning_rate=0.001", "optim.learning_rate=0.002"]
    for bar, cell in zip(finals.containers, cells):
        jobs = [job for job, swept in JOBS.items() if swept.startswith(cell.split("=")[1])]
        val = np.array([[r["val_loss"] for r in read_metrics(sweep / job) if r["kind"] == "eval"] for job in jobs])  # (seed, eval)
        mean = val.mean(axis=0)
        low, high = sp.t.interval(0.95, 2, loc=mean, scale=sp.sem(val, axis=0))
        label = f"{cell} (n=3)"
        assert lines(curves)[label] == ([10, 20], pytest.approx(list(mean), abs=1e-12))
        outline = bands[label].get_paths()[0].vertices[:, 1]  # the band: along one edge and back along the other
        assert set(outline.round(9)) == set(np.r_[low, high].round(9))
        final = val[:, -1]
        (point,) = bar.lines[0].get_xdata()
        segment = bar.lines[2][0].get_segments()[0]
        assert point == pytest.approx(final.mean(), abs=1e-12)
        f_low, f_high = sp.t.interval(0.95, 2, loc=final.mean(), scale=sp.sem(final))
        assert sorted(segment[:, 0]) == pytest.approx([f_low, f_high], abs=1e-9)
    assert overrides(sweep / "0")[0] in figure.get_suptitle()  # the shared overrides


def test_plot_of_a_folder_without_runs_is_an_error(tmp_path):
    proc = plot_command(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path}: no metrics.jsonl in it or in folders below it: not a run or sweep folder\n"


def test_final_loss_against_a_swept_key(sweep, tmp_path):
    """A line per seed, the loss at each learning rate as summary.csv gives it, the best ringed."""
    import csv

    fig, lines = swept_figure([sweep], "optim.learning_rate", "system.seed")
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    for seed in (1, 2, 3):
        mine = [r for r in rows if f"system.seed={seed}" in r["overrides"].split()]
        best = min(mine, key=lambda r: float(r["final_val_loss"]))
        rate = next(o.split("=")[1] for o in best["overrides"].split() if o.startswith("optim.learning_rate="))
        assert f"{sweep}: system.seed={seed}: best optim.learning_rate={float(rate):g} " \
               f"(final_val_loss {float(best['final_val_loss']):.4f})" in lines
    curves = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("system.seed=")]
    assert len(curves) == 3 and all(list(c.get_xdata()) == [0.001, 0.002] for c in curves)
