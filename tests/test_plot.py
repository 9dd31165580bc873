"""Plots of a real 2-job sweep and of one of its runs: the PNGs exist and the plotted lines are
the values of the runs' metrics.jsonl."""

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_script
from nanogpt.plot import run_figures, sweep_figures
from nanogpt.rundir import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
BPB = ["eval=[bpb]", "eval.interval=10", "eval.tasks.bpb.tokens=256"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    """A 2-job multirun over the learning rate, with bits per byte every 10 iterations."""
    folder = tmp_path_factory.mktemp("sweep")
    run_script("train.py", "-m", *TINY, f"data.root={data_root}", "optim.learning_rate=1e-3,2e-3", *BPB,
               f"hydra.sweep.dir={folder}", cwd=folder)
    return folder


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
        assert len(plotted) == 2
        for job, lr in (("0", "0.001"), ("1", "0.002")):  # Hydra records a swept value as it parsed it
            evals = [r for r in read_metrics(sweep / job) if r["kind"] == "eval"]
            # only what differs between the jobs: the shared overrides are in the title
            assert plotted[f"{job}: optim.learning_rate={lr}"] == ([r[x] for r in evals], [r["val_loss"] for r in evals])
    assert [t.get_text() for t in by_iter.get_legend().get_texts()] == list(lines(by_iter))
    bpb = lines(figures["tasks"].axes[0])
    for job, lr in (("0", "0.001"), ("1", "0.002")):
        tasks = [r for r in read_metrics(sweep / job) if r["kind"] == "tasks"]
        assert bpb[f"{job}: optim.learning_rate={lr}"] == ([10, 20], [r["bpb"] for r in tasks])

    proc = plot_command(sweep)
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "val_loss.png").read_bytes().startswith(PNG)
    assert (sweep / "tasks.png").read_bytes().startswith(PNG)


def test_plot_of_a_folder_without_runs_is_an_error(tmp_path):
    proc = plot_command(tmp_path)
    assert proc.returncode == 1 and "not a run or sweep folder" in proc.stderr
