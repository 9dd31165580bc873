"""Sharded training (FSDP2) on CPU with gloo and 2 ranks: it follows one process, starts from the
same weights, resumes bit-identically after kill -9 and at another world size, and its sharded
checkpoints are read by sampling, export and consolidation as any run's. Activation
checkpointing leaves the losses as they were."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from faults import PAUSE_BEFORE_POINTER_RENAME, inject
from nanogpt.checkpoint import consolidate, load_checkpoint, model_from_state, read_checkpoint, weights_file
from nanogpt.export import export
from nanogpt.rundir import read_metrics

pytestmark = pytest.mark.slow

FSDP = "system.parallelism=fsdp"


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def command(data_root, run_dir, *overrides, nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    # global batch 2 micro-steps: one a rank on 2 ranks, both in one process
    return [*launcher, str(ROOT / "train.py"), *TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}",
            "gradient_accumulation_steps=2", "log_interval=1", "eval_interval=5", "schedule.lr_decay_iters=30", *overrides]


def train(data_root, run_dir, *overrides, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(data_root, run_dir, *overrides, nproc=nproc), cwd=run_dir.parent, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as a crashed node would (torchrun starts its
    ranks in sessions of their own: a process-group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def losses(run_dir) -> dict:
    return {(r["iter"], r["kind"]): r.get("loss", r.get("val_loss")) for r in read_metrics(run_dir)}


def assert_follows(run_dir, reference, tol: float = 1e-4) -> None:
    a, b = losses(run_dir), losses(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), (k, a[k], b[k])


def test_fsdp_follows_one_process_and_resumes_at_any_world_size(tmp_path, data_root):
    one = tmp_path / "one"
    train(data_root, one, "max_iters=20", "eval_at_start=true")
    sharded = tmp_path / "sharded"
    train(data_root, sharded, FSDP, "max_iters=20", "eval_at_start=true", nproc=2)
    assert_follows(sharded, one)
    assert losses(sharded)[(0, "eval")] == pytest.approx(losses(one)[(0, "eval")], abs=1e-6)  # the same initial weights
    assert (sharded / "ckpt" / "latest").is_file() and not (sharded / "ckpt.pt").exists()

    # 2 ranks -> 1: the sharded checkpoint of iteration 10 read by one process
    two_to_one = tmp_path / "two_to_one"
    train(data_root, two_to_one, FSDP, "max_iters=10", "eval_at_start=true", nproc=2)
    train(data_root, two_to_one, "max_iters=20", "eval_at_start=true")
    assert_follows(two_to_one, one)
    assert (two_to_one / "ckpt.pt").exists() and not (two_to_one / "ckpt").exists()  # one format at a time

    # 1 -> 2 ranks: ckpt.pt's whole model and optimizer state, sharded (ranks started by the job itself)
    one_to_two = tmp_path / "one_to_two"
    train(data_root, one_to_two, "max_iters=10", "eval_at_start=true")
    train(data_root, one_to_two, FSDP, "max_iters=20", "eval_at_start=true", "system.nproc_per_node=2")
    assert_follows(one_to_two, one)

    # 2 micro-steps a rank, gradients reduce-scattered on the last only
    train(data_root, tmp_path / "accumulate_one", "gradient_accumulation_steps=4", "max_iters=10")
    train(data_root, tmp_path / "accumulate_sharded", "gradient_accumulation_steps=4", "max_iters=10", FSDP,
          "system.reduce_every_micro_step=false", nproc=2)
    assert_follows(tmp_path / "accumulate_sharded", tmp_path / "accumulate_one")

    # Muon orthogonalises whole matrices of the sharded parameters
    train(data_root, tmp_path / "muon_one", "optim=muon", "max_iters=20")
    train(data_root, tmp_path / "muon_sharded", "optim=muon", FSDP, "max_iters=20", nproc=2)
    assert_follows(tmp_path / "muon_sharded", tmp_path / "muon_one", tol=1e-3)

    # sampling, export and consolidation read the sharded run as the same weights unsharded
    whole = model_from_state(read_checkpoint(weights_file(sharded)))
    consolidated = load_checkpoint(consolidate(sharded, tmp_path / "consolidated.pt"))
    assert all(torch.equal(v, consolidated["model"][k]) for k, v in whole.state_dict().items())
    samples = [subprocess.run([sys.executable, str(ROOT / "sample.py"), f"init_from={source}", "num_samples=2",
                               "max_new_tokens=30", "device=cpu", "stream=false"], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=300) for source in (sharded, tmp_path / "consolidated.pt")]
    assert samples[0].returncode == 0 and samples[0].stdout == samples[1].stdout, samples[0].stderr
    export(sharded, tmp_path / "hf_sharded")
    export(tmp_path / "consolidated.pt", tmp_path / "hf_whole")
    assert (tmp_path / "hf_sharded" / "model.safetensors").read_bytes() == (tmp_path / "hf_whole" / "model.safetensors").read_bytes()


def test_kill_9_then_resume_under_fsdp_is_bit_identical(tmp_path, data_root):
    args = ["max_iters=120", "model.dropout=0.1", "schedule.lr_decay_iters=120"]
    straight = tmp_path / "straight"
    train(data_root, straight, FSDP, *args, nproc=2)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(data_root, killed, FSDP, *args, nproc=2), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(8, 90)  # a random iteration past the first checkpoint (5)
    t0 = time.monotonic()
    while not any(r["iter"] >= kill_after for r in read_metrics(killed)) and proc.poll() is None:
        assert time.monotonic() - t0 < 240
        time.sleep(0.02)
    kill_tree(proc.pid)  # torchrun and both ranks at once
    assert proc.wait() == -signal.SIGKILL, f"the run ended before iteration {kill_after}"
    resumed = train(data_root, killed, FSDP, *args, nproc=2)
    assert "resuming at iteration" in resumed.stdout

    # a kill during a sharded save: the step folder is written, the pointer not yet replaced
    mid_save = tmp_path / "mid_save"
    proc = subprocess.Popen(command(data_root, mid_save, FSDP, *args, nproc=2), cwd=tmp_path,
                            env=env() | inject(tmp_path, PAUSE_BEFORE_POINTER_RENAME),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not (mid_save / "ckpt" / "paused").exists():
        assert time.monotonic() - t0 < 240 and proc.poll() is None
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    assert (mid_save / "ckpt" / "latest").read_text().strip() == "00000005"  # the previous save, still in use
    resumed = train(data_root, mid_save, FSDP, *args, nproc=2)
    assert "resuming at iteration 5 " in resumed.stdout
    assert sorted(p.name for p in (mid_save / "ckpt").iterdir()) == ["00000120", "latest", "paused"]  # the cut save is gone

    for run in (killed, mid_save):
        assert losses(run) == losses(straight)
        a, b = (model_from_state(read_checkpoint(weights_file(d))).state_dict() for d in (straight, run))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("parallel_dropout", [False, True])
def test_activation_checkpointing_leaves_the_losses_identical(tmp_path, data_root, parallel_dropout):
    args = ["max_iters=8", "model.dropout=0.1", f"system.parallel_dropout={parallel_dropout}"]
    train(data_root, tmp_path / "plain", *args)
    train(data_root, tmp_path / "recomputed", *args, "system.activation_checkpointing=1")
    assert losses(tmp_path / "recomputed") == losses(tmp_path / "plain")
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("plain", "recomputed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # and the saved names are the same
