"""Sweeps on this machine: the basic launcher, submitit_local, a failing job, an Optuna search,
and the cells of a seeded sweep (2 learning rates x 3 seeds, shared with test_plot). The summary
and the cells must come from the jobs' own files (status.json, metrics.jsonl, overrides)."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sp

from conftest import ROOT, SEEDED_BASELINE, SEEDED_TARGET, TINY, run_script
from nanogpt.rundir import read_metrics, write_status
from nanogpt.sweep import main

pytestmark = pytest.mark.slow
ONE_THREAD = "system.num_threads=1"  # a tiny model gains nothing from more, and jobs may run side by side


def sweep(tmp_path: Path, data_root: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["-m", *TINY, ONE_THREAD, f"data.root={data_root}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return run_script("train.py", *args, cwd=tmp_path, check=check)


def summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def swept(row: dict, key: str) -> str:
    """The value of one override of a summary row."""
    return dict(o.split("=", 1) for o in row["overrides"].split())[key]


def assert_read_from_job(row: dict, sweep_dir: Path) -> None:
    val = [m["val_loss"] for m in read_metrics(sweep_dir / row["job"]) if m["kind"] == "eval"]
    assert float(row["best_val_loss"]) == min(val)
    assert float(row["final_val_loss"]) == val[-1]


def test_basic_sweep_writes_a_summary_and_the_command_rebuilds_it(seeded_sweep, tmp_path):
    shared, proc = seeded_sweep
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(shared, sweep_dir)
    rows = summary(sweep_dir)
    assert sorted(float(swept(r, "optim.learning_rate")) for r in rows) == [1e-3] * 3 + [2e-3] * 3
    assert [r["status"] for r in rows] == ["finished"] * 6
    assert [r["iters"] for r in rows] == ["20"] * 6
    for row in rows:
        assert_read_from_job(row, sweep_dir)
    best = [float(r["best_val_loss"]) for r in rows]
    assert best == sorted(best)  # best first
    assert "optim.learning_rate=0.002 system.seed=3" in proc.stdout  # the printed table shows what was swept
    for row in rows:  # a column per task metric: its last value
        assert float(row["bpb"]) == [m for m in read_metrics(sweep_dir / row["job"]) if m["kind"] == "tasks"][-1]["bpb"]
    assert " bpb " in proc.stdout
    header = (sweep_dir / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[4:5] == ["bpb"] and header.count("flops") == 1  # a task record's counters are no task metric
    by_bpb = subprocess.run([sys.executable, "-m", "nanogpt.sweep", str(sweep_dir), "--sort", "bpb"],
                            capture_output=True, text=True, check=True)
    assert [r["job"] for r in summary(sweep_dir)] == [r["job"] for r in sorted(rows, key=lambda r: float(r["bpb"]))]
    assert "bpb" in by_bpb.stdout

    (sweep_dir / "summary.csv").unlink()
    main([str(sweep_dir)])
    assert summary(sweep_dir) == rows  # best val loss first again


def cells(sweep_dir: Path) -> dict[str, dict]:
    """cells.csv's rows by their learning rate."""
    with open(sweep_dir / "cells.csv") as f:
        return {swept(r, "optim.learning_rate"): r for r in csv.DictReader(f)}


def final(job: Path) -> float:
    return [m for m in read_metrics(job) if m["kind"] == "eval"][-1]["val_loss"]


def finals(sweep_dir: Path) -> dict[str, list[float]]:
    """Each learning rate's final val losses, read from its jobs' metrics.jsonl."""
    by_lr = {}
    for row in summary(sweep_dir):
        by_lr.setdefault(swept(row, "optim.learning_rate"), []).append(final(sweep_dir / row["job"]))
    return by_lr


def iters_to(target: float, evals: list[dict]) -> float | None:
    """By hand: the first evaluation at or below target, interpolated from the one before."""
    for before, e in zip([None, *evals], evals):
        if e["val_loss"] <= target:
            if before is None:
                return e["iter"]
            return before["iter"] + (before["val_loss"] - target) / (before["val_loss"] - e["val_loss"]) * (e["iter"] - before["iter"])
    return None


def test_a_seeded_sweep_writes_cells_with_intervals_and_a_p_value(seeded_sweep):
    sweep_dir, proc = seeded_sweep
    rows, losses = cells(sweep_dir), finals(sweep_dir)
    assert sorted(rows) == ["0.001", "0.002"]
    base, other = losses["0.001"], losses["0.002"]
    for lr, row in rows.items():
        x = losses[lr]
        assert (row["n"], row["failed"]) == ("3", "0")
        low, high = sp.t.interval(0.95, 2, loc=np.mean(x), scale=sp.sem(x))
        assert float(row["final_val_loss/mean"]) == pytest.approx(np.mean(x), abs=1e-9)
        assert (float(row["final_val_loss/ci_low"]), float(row["final_val_loss/ci_high"])) == pytest.approx((low, high), abs=1e-9)
        p = sp.ttest_1samp(x, SEEDED_TARGET, alternative="less").pvalue
        assert float(row["final_val_loss/p_target"]) == pytest.approx(p, abs=1e-9)
        jobs = [r["job"] for r in summary(sweep_dir) if swept(r, "optim.learning_rate") == lr]
        to_target = [iters_to(SEEDED_TARGET, [m for m in read_metrics(sweep_dir / j) if m["kind"] == "eval"]) for j in jobs]
        assert int(row["reached"]) == sum(t is not None for t in to_target)
        mean = row["iters_to_target/mean"]
        assert float(mean) == pytest.approx(np.mean(to_target), abs=1e-9) if None not in to_target else mean == ""
    assert rows["0.001"]["baseline"] == "True"
    welch = sp.ttest_ind(other, base, equal_var=False)
    assert float(rows["0.002"]["final_val_loss/p_value"]) == pytest.approx(welch.pvalue, abs=1e-9)
    assert float(rows["0.002"]["final_val_loss/diff"]) == pytest.approx(np.mean(other) - np.mean(base), abs=1e-9)
    assert "2 cells" in proc.stdout and "noise floor of final val" in proc.stdout
    assert "optim.learning_rate=0.001  3  " in proc.stdout and " ± " in proc.stdout


def fail(job: Path) -> None:
    write_status(job, "failed", error="RuntimeError: damaged by the test")


def test_a_failed_job_is_left_out_and_counted_and_a_cell_of_one_prints_without_interval(seeded_sweep, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(seeded_sweep[0], sweep_dir)
    jobs = [r["job"] for r in summary(sweep_dir) if swept(r, "optim.learning_rate") == "0.002"]
    fail(sweep_dir / jobs[0])
    main([str(sweep_dir), "--baseline", "optim.learning_rate=1e-3"])
    row = cells(sweep_dir)["0.002"]
    assert (row["n"], row["failed"]) == ("2", "1")
    welch = sp.ttest_ind([final(sweep_dir / j) for j in jobs[1:]], finals(sweep_dir)["0.001"], equal_var=False)
    assert float(row["final_val_loss/p_value"]) == pytest.approx(welch.pvalue, abs=1e-9)
    assert "2 (+1 failed)" in capsys.readouterr().out

    fail(sweep_dir / jobs[1])
    main([str(sweep_dir), "--baseline", "optim.learning_rate=1e-3"])
    row = cells(sweep_dir)["0.002"]
    assert (row["n"], row["failed"]) == ("1", "2")
    assert row["final_val_loss/ci_low"] == row["final_val_loss/p_value"] == row["final_val_loss/std"] == ""
    assert float(row["final_val_loss/mean"]) == final(sweep_dir / jobs[2])
    assert float(row["final_val_loss/diff"]) == pytest.approx(float(row["final_val_loss/mean"]) - np.mean(finals(sweep_dir)["0.001"]))
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("optim.learning_rate=0.002 ")]
    assert "1 (+2 failed)" in line and "±" not in line and "nan" not in line


def test_a_cell_split_across_two_sweep_folders_gives_the_same_row(seeded_sweep, tmp_path):
    whole = seeded_sweep[0]
    first, second = tmp_path / "first", tmp_path / "second"  # e.g. seeds 1 and 2 yesterday, seed 3 today
    for row in summary(whole):
        shutil.copytree(whole / row["job"], (second if swept(row, "system.seed") == "3" else first) / row["job"])
    main([str(first), str(second), "--baseline", SEEDED_BASELINE, "--target", str(SEEDED_TARGET)])
    assert (first / "cells.csv").read_text() == (whole / "cells.csv").read_text()
    assert not (second / "cells.csv").exists()  # the first folder's, over both


def test_a_failing_job_does_not_stop_the_sweep_and_is_marked_failed(tmp_path, data_root):
    proc = sweep(tmp_path, data_root, "data.batch_size=-1,4", check=False)
    assert proc.returncode != 0  # Hydra re-raises the failure at the end, and skips on_multirun_end
    rows = {swept(r, "data.batch_size"): r for r in summary(tmp_path / "sweep")}  # written by train.py's finally
    assert rows["4"]["status"] == "finished"
    assert rows["-1"]["status"] == "failed"
    assert "data.batch_size=-1 must be positive" in rows["-1"]["error"]


def test_submitit_local_sweep(tmp_path, data_root):
    sweep(tmp_path, data_root, "hydra/launcher=local", "optim.learning_rate=1e-3,2e-3")
    sweep_dir = tmp_path / "sweep"
    rows = summary(sweep_dir)
    assert sorted(float(swept(r, "optim.learning_rate")) for r in rows) == [1e-3, 2e-3]
    assert [r["status"] for r in rows] == ["finished", "finished"]
    for row in rows:
        assert_read_from_job(row, sweep_dir)
    jobs = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]  # a local job's id is its pid
    assert len(jobs) == 2  # each job ran as its own submitit job


def wait_for(condition, what: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text()}")
        time.sleep(0.02)


def test_optuna_search_continues_from_its_study_after_an_interruption(tmp_path, data_root):
    optuna = pytest.importorskip("optuna", reason="needs the optuna extra: pip install -e '.[optuna]'")
    search = tmp_path / "multirun" / "lr_wd"  # the preset's folders, under the working directory
    args = ["-m", "hparams_search=lr_wd", *TINY, ONE_THREAD, f"data.root={data_root}", "max_iters=100", "eval_interval=50"]
    storage = f"sqlite:///{search / 'optuna.db'}"

    # 1) a 2-trial search, stopped with Ctrl-C during the second trial
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, "hydra.sweeper.n_trials=2"],
            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out,
        )
    try:
        second_trains = lambda: any(m["kind"] == "train" for p in search.glob("*/1") for m in read_metrics(p))  # noqa: E731
        wait_for(second_trains, "the second trial to train", log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()  # a failed wait must not leave the search running; a no-op once it ended
    first = optuna.load_study(study_name="lr_wd", storage=storage).trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]  # the interrupted trial never reported
    [first_start] = [p.parent for p in search.glob("*/1")]
    assert sorted(r["status"] for r in summary(first_start)) == ["finished", "interrupted"]

    # 2) the same command again goes on with the stored study, in a sweep folder of its own
    time.sleep(1)  # sweep folders are named by the second the search started
    run_script("train.py", *args, "hydra.sweeper.n_trials=1", cwd=tmp_path)
    trials = optuna.load_study(study_name="lr_wd", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "COMPLETE"]
    assert (trials[0].params, trials[0].value) == (first[0].params, first[0].value)

    subprocess.run([sys.executable, "-m", "nanogpt.sweep", str(search)], check=True, capture_output=True)
    rows = summary(search)  # every trial of both starts
    assert sorted(r["status"] for r in rows) == ["finished", "finished", "interrupted"]
    assert {float(r["best_val_loss"]) for r in rows if r["status"] == "finished"} == {trials[0].value, trials[2].value}
