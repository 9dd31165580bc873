"""Sweeps on this machine: the basic launcher, submitit_local, a failing job, an Optuna search.
The summary table must come from the jobs' own files (status.json, metrics.jsonl, overrides)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_script
from nanogpt.rundir import read_metrics

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


def test_basic_sweep_writes_a_summary_and_the_command_rebuilds_it(tmp_path, data_root):
    bpb = ["eval=[bpb]", "eval.interval=10", "eval.tasks.bpb.tokens=256"]
    proc = sweep(tmp_path, data_root, "optim.learning_rate=1e-3,2e-3", *bpb)
    sweep_dir = tmp_path / "sweep"
    rows = summary(sweep_dir)
    assert sorted(float(swept(r, "optim.learning_rate")) for r in rows) == [1e-3, 2e-3]
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert [r["iters"] for r in rows] == ["20", "20"]
    for row in rows:
        assert_read_from_job(row, sweep_dir)
    assert float(rows[0]["best_val_loss"]) <= float(rows[1]["best_val_loss"])  # best first
    assert "optim.learning_rate=0.002" in proc.stdout  # the printed table shows what was swept
    for row in rows:  # a column per task metric: its last value
        assert float(row["bpb"]) == [m for m in read_metrics(sweep_dir / row["job"]) if m["kind"] == "tasks"][-1]["bpb"]
    assert " bpb " in proc.stdout
    by_bpb = subprocess.run([sys.executable, "-m", "nanogpt.sweep", str(sweep_dir), "--sort", "bpb"],
                            capture_output=True, text=True, check=True)
    assert [r["job"] for r in summary(sweep_dir)] == [r["job"] for r in sorted(rows, key=lambda r: float(r["bpb"]))]
    assert "bpb" in by_bpb.stdout

    (sweep_dir / "summary.csv").unlink()
    out = subprocess.run([sys.executable, "-m", "nanogpt.sweep", str(sweep_dir)], capture_output=True, text=True, check=True)
    assert summary(sweep_dir) == rows  # best val loss first again
    assert "finished" in out.stdout


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
