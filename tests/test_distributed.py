"""Data parallelism on CPU with gloo: torchrun, in-job spawning, equivalence, failures."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY
from faults import inject
from nanogpt.checkpoint import load_checkpoint
from nanogpt.rundir import read_metrics

pytestmark = pytest.mark.slow

# a rank that raises on purpose: injected from outside through sitecustomize, no hook in the code
FAIL_RANK_1 = """
import os
import nanogpt.model
forward = nanogpt.model.GPT.forward
calls = []
def failing_forward(self, *args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 3:  # read late: spawned ranks get RANK after start-up
        raise RuntimeError("injected failure on rank 1")
    return forward(self, *args, **kwargs)
nanogpt.model.GPT.forward = failing_forward
"""


def run(args: list[str], cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(*overrides: str, cwd, nproc=2, script="train.py", **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script)]
    return run(cmd + list(overrides), cwd, **kw)


def python_train(*overrides: str, cwd, **kw):
    return run([sys.executable, str(ROOT / "train.py"), *overrides], cwd, **kw)


def settings(data_root, *extra):
    base = [*TINY, f"data.root={data_root}", "max_iters=8", "eval_interval=4", "log_interval=1", "eval_iters=4"]
    return [*base, "gradient_accumulation_steps=2", *extra]  # global: one micro-step per rank


def only_run_folder(cwd):
    folders = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def assert_one_of_each(run_dir):
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "ckpt.pt", "metrics.jsonl", "status.json", "train.log"
    ]
    log = (run_dir / "train.log").read_text()
    assert log.count("run folder") == 1  # one rank wrote it


def test_two_ranks_match_one_process_with_twice_the_accumulation(tmp_path, data_root):
    single = python_train(*settings(data_root, "gradient_accumulation_steps=4", f"hydra.run.dir={tmp_path}/single"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = torchrun(*settings(data_root, "gradient_accumulation_steps=4", f"hydra.run.dir={tmp_path}/ddp"), cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "train_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra, rb)
    wa = load_checkpoint(tmp_path / "single" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
    assert "tokens per iteration 512 (4 micro-steps x 4 x 32)" in ddp.stdout  # the global figure


def test_torchrun_writes_one_run_folder(tmp_path, data_root):
    proc = torchrun(*settings(data_root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_one_of_each(only_run_folder(tmp_path))
    assert proc.stdout.count("run folder") == 1  # only rank 0 prints


def test_one_rank_under_torchrun_trains_through_ddp(tmp_path):
    """As nanoGPT's: a lone torchrun rank joins a process group (NCCL on a GPU: tests/test_gpu.py)."""
    args = [*TINY, "model.vocab_size=100", "bench.data=synthetic", "bench.iters=1", "bench.warmup=0", "bench.json=true"]
    proc = torchrun(*args, cwd=tmp_path, nproc=1, script="bench.py")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["world_size"], r["parallelism"]) == (1, "ddp")


def test_nproc_per_node_spawns_ranks_inside_the_job(tmp_path, data_root):
    proc = python_train(*settings(data_root, "system.nproc_per_node=2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_folder(tmp_path)
    assert_one_of_each(run_dir)
    assert "world size 2" in (run_dir / "train.log").read_text()


def test_ddp_run_resumes_at_its_checkpoint(tmp_path, data_root):
    first = torchrun(*settings(data_root, f"hydra.run.dir={tmp_path}/run"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = torchrun(*settings(data_root, f"hydra.run.dir={tmp_path}/run", "max_iters=12"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming at iteration 8" in second.stdout
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["iter_num"] == 12


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, data_root, launcher):
    env = inject(tmp_path, FAIL_RANK_1)
    args = settings(data_root, "max_iters=50", "system.dist_timeout_s=60", f"hydra.run.dir={tmp_path}/run")
    t0 = time.monotonic()
    if launcher == "torchrun":
        proc = torchrun(*args, cwd=tmp_path, env=env)
    else:
        proc = python_train(*args, "system.nproc_per_node=2", cwd=tmp_path, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert elapsed < 55, f"took {elapsed:.0f}s: waited for the collective timeout instead of failing"


def test_slurm_variables_without_peers_train_as_one_process(tmp_path, data_root):
    """A plain `sbatch -n2` batch script has SLURM_NTASKS/SLURM_PROCID but no peers: no waiting."""
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "123"}
    proc = python_train(*settings(data_root, f"hydra.run.dir={tmp_path}/run"), cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world size 1" in proc.stdout
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["provenance"]["slurm_job_id"] == "123"


def test_accumulation_must_divide_among_ranks(tmp_path, data_root):
    proc = torchrun(*settings(data_root, "gradient_accumulation_steps=3", f"hydra.run.dir={tmp_path}/run"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "gradient_accumulation_steps=3 must be divisible by the world size 2" in proc.stderr
