"""Sweeps on a real SLURM cluster through hydra-submitit-launcher: jobs, DDP tasks, requeue.

Needs a running cluster (scripts/slurm-up.sh starts a one-node one). Without one these tests
skip, unless NANOGPT_REQUIRE_SLURM is set (CI), where a missing cluster is a failure.
"""

import csv
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from faults import inject
from nanogpt.rundir import read_metrics, read_status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# job 1's rank 1 raises at its first forward: injected through sitecustomize, which every Python
# process of the jobs loads (they inherit the submitter's environment); no hook in the code
FAIL_RANK_1_OF_JOB_1 = """
import os
import nanogpt.model
forward = nanogpt.model.GPT.forward
def failing_forward(self, *args, **kwargs):
    if os.environ.get("SLURM_ARRAY_TASK_ID") == "1" and os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 of job 1 failed on purpose")
    return forward(self, *args, **kwargs)
nanogpt.model.GPT.forward = failing_forward
"""


def cluster_problem() -> str | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no SLURM cluster reachable ({e})"
    if out.returncode != 0 or "up" not in out.stdout.split():
        return f"no SLURM partition up (sinfo: {(out.stderr or out.stdout).strip()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = cluster_problem()
    if problem and os.environ.get("NANOGPT_REQUIRE_SLURM"):
        pytest.fail(f"{problem}; CI must start it with scripts/slurm-up.sh")
    if problem:
        pytest.skip(f"{problem}; start one with scripts/slurm-up.sh")


def sweep_args(data_root: Path, sweep_dir: str, *overrides: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm_cpu", *TINY, "system.num_threads=1",
        f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}", *overrides,
    ]


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary(sweep_dir: Path) -> dict[str, dict]:
    """The summary's rows by job folder."""
    with open(sweep_dir / "summary.csv") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def submitit_job_id(sweep_dir: Path, job_num: int) -> str:
    """SLURM's id of a job of the sweep (an array task: <array id>_<job num>)."""
    [folder] = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith(f"_{job_num}")]
    return folder.name


def sacct_states(job_id: str, at_least: int) -> list[str]:
    """The job's records in SLURM's accounting, one per start (-D: requeued starts too).
    sacct lags a few seconds behind the jobs: poll."""
    for _ in range(60):
        out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
        states = out.stdout.split()
        if len(states) >= at_least and "RUNNING" not in states and "PENDING" not in states:
            return states
        time.sleep(1)
    return states


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_only_a_multi_task_step_makes_ranks(tmp_path):
    """distributed.py joins a process group in an srun step of several tasks (what submitit runs),
    not in a batch script that merely asked for several tasks."""
    probe = [sys.executable, "-c", "from nanogpt.distributed import srun_step_env; print(srun_step_env())"]
    out = tmp_path / "batch.out"
    batch = run(["sbatch", "-n2", "-o", str(out), "--wrap", shlex.join(probe)], tmp_path)
    assert batch.returncode == 0, batch.stderr
    wait_for(lambda: out.exists() and out.read_text().split(), "the batch script's output")  # sbatch --wait polls slowly
    assert out.read_text().split() == ["False"]
    step = run(["srun", "-n2", *probe], tmp_path)
    assert step.stdout.split() == ["True", "True"], step.stderr


def test_ddp_jobs_one_run_folder_each_and_a_failing_rank_ends_its_job_at_once(tmp_path, data_root):
    """Two jobs of 2 tasks each: job 0 trains as one 2-rank gloo run; in job 1 rank 1 raises and
    the job ends with that error, long before the collective time-out (600 s here)."""
    env = inject(tmp_path, FAIL_RANK_1_OF_JOB_1)
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(
        data_root, str(sweep_dir), "hydra.launcher.tasks_per_node=2", "gradient_accumulation_steps=2",
        "system.dist_timeout_s=600", "optim.learning_rate=1e-3,2e-3",
    )
    proc = run(args, tmp_path, env=env)
    assert proc.returncode != 0  # the failed job fails the sweep

    rows = summary(sweep_dir)
    assert rows["0"]["status"] == "finished", rows["0"]
    assert rows["0"]["iters"] == "20"
    assert "world size 2" in (sweep_dir / "0" / "train.log").read_text()
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".submitit", "0", "1", "cells.csv", "multirun.yaml", "summary.csv"]
    task_logs = (sweep_dir / ".submitit" / submitit_job_id(sweep_dir, 0)).glob("*_log.out")
    assert len(list(task_logs)) == 2  # two tasks, one run folder

    assert rows["1"]["status"] == "failed"
    assert rows["1"]["error"] == "rank 1: RuntimeError: rank 1 of job 1 failed on purpose"  # the cause, not its echo


def test_an_fsdp_job_of_two_tasks_trains_sharded_in_one_run_folder(tmp_path, data_root):
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(data_root, str(sweep_dir), "hydra.launcher.tasks_per_node=2", "gradient_accumulation_steps=2",
                      "system.parallelism=fsdp")
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep_dir)
    assert rows["0"]["status"] == "finished" and rows["0"]["iters"] == "20", rows["0"]
    run_dir = sweep_dir / "0"
    assert "world size 2" in (run_dir / "train.log").read_text()
    assert (run_dir / "ckpt" / "latest").is_file() and not (run_dir / "ckpt.pt").exists()  # a sharded checkpoint
    assert {p.name for p in (run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()).iterdir()} >= {
        "__0_0.distcp", "__1_0.distcp", "train_state.pt"}  # written by both tasks


def test_signalled_job_saves_requeues_and_resumes_in_its_folder(tmp_path, data_root):
    """A 2-job sweep of the same training (log_interval changes what is logged, not what is
    trained). Job 0 gets SLURM's warning signal mid-run: it saves, is requeued, resumes in the same
    folder (the sweep folder holds ${now:}) and ends with job 1's val loss to the last bit."""
    multirun = tmp_path / "multirun"
    args = sweep_args(data_root, f"{multirun}/${{now:%H-%M-%S-%f}}", "max_iters=200", "eval_interval=100", "log_interval=5,10")
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out)
    try:
        job0 = lambda: next(multirun.glob("*/0"), None)  # noqa: E731
        wait_for(lambda: job0() and any(m["kind"] == "train" for m in read_metrics(job0())), "job 0 to train")
        sweep_dir = job0().parent
        job_id = submitit_job_id(sweep_dir, 0)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # submitit's warning signal (SLURM sends it before the limit)
        wait_for(lambda: read_status(job0()).get("status") == "preempted", "job 0 to be requeued")
        assert proc.wait(timeout=240) == 0, log.read_text()
    finally:
        proc.kill()

    assert [p.name for p in multirun.iterdir()] == [sweep_dir.name]  # the requeued job found its sweep folder
    assert sacct_states(job_id, at_least=2) == ["REQUEUED", "COMPLETED"]
    assert sacct_states(submitit_job_id(sweep_dir, 1), at_least=1) == ["COMPLETED"]
    train_log = (sweep_dir / "0" / "train.log").read_text()
    assert "SIGUSR2 received" in train_log
    k = int(re.search(r"resuming at iteration (\d+)", train_log).group(1))
    assert 0 < k < 200

    rows = summary(sweep_dir)
    assert [rows[j]["status"] for j in ("0", "1")] == ["finished", "finished"]
    assert "log_interval=5" in rows["0"]["overrides"].split() and "log_interval=10" in rows["1"]["overrides"].split()
    assert rows["0"]["iters"] == rows["1"]["iters"] == "200"
    assert rows["0"]["final_val_loss"] == rows["1"]["final_val_loss"]  # the same run as one never stopped
