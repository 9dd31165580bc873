"""The reliability promises, each checked the hard way: kills, signals, full disks, bad input,
malicious files, secrets."""

import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from faults import PAUSE_BEFORE_CHECKPOINT_RENAME, inject
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import SystemConfig
from nanogpt.errors import UserError
from nanogpt.device import resolve_dtype
from nanogpt.rundir import read_metrics, read_status

pytestmark = pytest.mark.slow


def train_cmd(data_root, run_dir, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides]


def run(cmd, cwd, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def start(cmd, cwd, env=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, timeout=240, what="condition"):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.05)


def history(run_dir) -> list[tuple]:
    """The run's losses by iteration, without timings (which differ run to run)."""
    return [(r["iter"], r["kind"], r.get("loss"), r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


def assert_clean_failure(proc, message):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- exact resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch,compile,parallel_dropout,order",
                         [(True, False, False, "random"), (False, False, False, "random"), (True, True, False, "random"),
                          (True, False, True, "random"), (True, True, True, "random"), (True, False, False, "epoch")])
def test_kill_9_then_resume_is_bit_identical(tmp_path, data_root, prefetch, compile, parallel_dropout, order):
    """Compiled CPU kernels accumulate some gradients with atomic adds, whose order varies from
    process to process; system.deterministic makes them deterministic."""
    args = ["max_iters=40", "eval_interval=5", "log_interval=1", "model.dropout=0.1",
            f"data.prefetch={prefetch}", f"system.compile={compile}", f"system.deterministic={compile}",
            f"system.parallel_dropout={parallel_dropout}", f"data.order={order}"]
    straight = run(train_cmd(data_root, tmp_path / "straight", *args), tmp_path)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    cmd = train_cmd(data_root, killed_dir, *args)
    proc = start(cmd, tmp_path)
    kill_after = random.Random().randint(6, 30)  # a random iteration past the first checkpoint
    wait_for(lambda: any(r["iter"] >= kill_after for r in read_metrics(killed_dir)) or proc.poll() is not None,
             what="training progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_status(killed_dir)["status"] == "running"  # a crash leaves no time to say otherwise
    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration" in resumed.stdout

    assert history(killed_dir) == history(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    b = load_checkpoint(killed_dir / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_runs_training_time_continues_from_its_checkpoint(tmp_path, data_root):
    """train_time_s is the time axis of time-to-loss figures and plots: a killed run's resume goes
    on from the checkpoint's value instead of starting again from zero."""
    run_dir = tmp_path / "run"
    args = ["max_iters=100000", "eval_interval=5", "log_interval=1"]
    proc = start(train_cmd(data_root, run_dir, *args), tmp_path)
    wait_for(lambda: (run_dir / "ckpt.pt").exists() and len(read_metrics(run_dir)) >= 12, what="a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(run_dir / "ckpt.pt")
    assert saved["train_time_s"] > 0
    resumed = run(train_cmd(data_root, run_dir, *args[1:], f"max_iters={saved['iter_num'] + 3}"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = [r for r in read_metrics(run_dir) if r["iter"] > saved["iter_num"]]
    assert after and all(r["train_time_s"] > saved["train_time_s"] for r in after)
    times = [r["train_time_s"] for r in read_metrics(run_dir)]
    assert times == sorted(times)  # one time axis, no restart at zero


# -- crash-safe checkpoints ----------------------------------------------------------------------

def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, data_root):
    run_dir = tmp_path / "run"
    first = run(train_cmd(data_root, run_dir, "max_iters=10"), tmp_path)
    assert first.returncode == 0, first.stderr
    proc = start(train_cmd(data_root, run_dir, "max_iters=20"), tmp_path, env=inject(tmp_path, PAUSE_BEFORE_CHECKPOINT_RENAME))
    wait_for(lambda: (run_dir / "ckpt.pt.paused").exists(), what="the paused save")
    assert (run_dir / ".ckpt.pt.tmp").exists()  # the new checkpoint is written, not yet renamed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run_dir / "ckpt.pt")["iter_num"] == 10
    again = run(train_cmd(data_root, run_dir, "max_iters=20"), tmp_path)  # the leftover trips nothing
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(run_dir / "ckpt.pt")["iter_num"] == 20


def test_a_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path, data_root):
    run_dir = tmp_path / "run"
    assert run(train_cmd(data_root, run_dir, "max_iters=10"), tmp_path).returncode == 0
    size = (run_dir / "ckpt.pt").stat().st_size

    def limit_file_size():  # the save exceeds this; logs and metrics stay below it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = run(train_cmd(data_root, run_dir, "max_iters=20"), tmp_path, preexec_fn=limit_file_size)
    assert_clean_failure(proc, "could not save checkpoint")
    assert load_checkpoint(run_dir / "ckpt.pt")["iter_num"] == 10
    assert not (run_dir / ".ckpt.pt.tmp").exists()
    assert read_status(run_dir)["status"] == "failed"


# -- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_marks_interrupted_and_exits_128_plus_signal(tmp_path, data_root, sig):
    run_dir = tmp_path / "run"
    cmd = train_cmd(data_root, run_dir, "max_iters=100000", "eval_interval=1000", "log_interval=1")
    proc = start(cmd, tmp_path)
    wait_for(lambda: len(read_metrics(run_dir)) >= 3, what="training progress")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert read_status(run_dir)["status"] == "interrupted"
    assert f"python train.py resume={run_dir}" in err
    saved = load_checkpoint(run_dir / "ckpt.pt")["iter_num"]
    assert saved > 0
    resumed = run(train_cmd(data_root, run_dir, f"max_iters={saved + 3}", "eval_interval=1000"), tmp_path)
    assert resumed.returncode == 0 and f"resuming at iteration {saved}" in resumed.stdout, resumed.stderr


def test_a_second_ctrl_c_exits_at_once(tmp_path, data_root):
    run_dir = tmp_path / "run"
    # a save that takes long (paused) is what a second Ctrl-C cuts short
    proc = start(train_cmd(data_root, run_dir, "max_iters=100000", "eval_interval=1000", "log_interval=1"), tmp_path,
                 env=inject(tmp_path, PAUSE_BEFORE_CHECKPOINT_RENAME))
    wait_for(lambda: len(read_metrics(run_dir)) >= 3, what="training progress")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: (run_dir / "ckpt.pt.paused").exists(), what="the interrupt's save")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 20 and proc.returncode != 0


# -- divergence ----------------------------------------------------------------------------------

def test_a_nan_stops_the_run_naming_the_iteration(tmp_path, data_root):
    proc = run(train_cmd(data_root, tmp_path / "run", "optim.learning_rate=1e9"), tmp_path)
    assert_clean_failure(proc, "non-finite loss or gradient norm at iteration")
    assert not (tmp_path / "run" / "ckpt.pt").exists()  # diverged weights are never saved


def test_skip_policy_skips_non_finite_steps(tmp_path, data_root):
    proc = run(train_cmd(data_root, tmp_path / "run", "optim.learning_rate=1e9", "nan_policy=skip"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step skipped" in proc.stdout + proc.stderr


# -- clear errors on bad input -------------------------------------------------------------------

def corrupt(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.n_embd=30", "model.n_head=4"], "n_embd (30) must be divisible by n_head (4)"),
        (["data.batch_size=0"], "data.batch_size=0 must be positive"),
        (["eval_iters=0"], "eval_iters=0 must be positive"),
        (["system.device=cuda"], "CUDA is not available"),
        (["init_from=resume"], "init_from=resume but there is no checkpoint"),
        (["init_from=gpt3"], "init_from='gpt3'"),
        (["data.source=[/nonexistent/book.txt]", "data.name=missing"], "/nonexistent/book.txt does not exist"),
        (["model.block_size=200000", "model.vocab_size=65"], "is larger than the val split"),
    ],
)
def test_invalid_input_is_one_clear_line(tmp_path, data_root, overrides, message):
    proc = run(train_cmd(data_root, tmp_path / "run", *overrides), tmp_path)
    assert_clean_failure(proc, message)
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert not [p for p in Path(data_root).iterdir() if not (p / "meta.json").exists() and p.is_dir()]  # no half-prepared data


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(UserError, match="no bf16"):
        resolve_dtype(SystemConfig(dtype="bfloat16"), torch.device("cuda"))


def test_a_data_folder_without_its_vocabulary_is_refused(tmp_path):
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "train.bin").write_bytes(b"")  # not ours to overwrite: an empty folder would be prepared
    proc = run(train_cmd(tmp_path / "data", tmp_path / "run", "data.name=mine"), tmp_path)
    assert_clean_failure(proc, "holds no prepared data")


def test_a_data_vocabulary_unlike_the_checkpoints_is_refused(tmp_path, data_root):
    run_dir = tmp_path / "run"
    assert run(train_cmd(data_root, run_dir, "max_iters=10"), tmp_path).returncode == 0
    proc = run(train_cmd(data_root, run_dir, "max_iters=20", "data=shakespeare"), tmp_path)
    assert_clean_failure(proc, "different vocabulary")


def test_a_truncated_checkpoint_is_refused(tmp_path, data_root):
    run_dir = tmp_path / "run"
    assert run(train_cmd(data_root, run_dir, "max_iters=10"), tmp_path).returncode == 0
    corrupt(run_dir / "ckpt.pt")
    proc = run(train_cmd(data_root, run_dir, "max_iters=20"), tmp_path)
    assert_clean_failure(proc, "cannot load checkpoint")


def test_a_damaged_checkpoint_pointer_is_refused(tmp_path):
    """A sharded run's ckpt/latest names its newest complete step folder; one that names none is
    damage, never "no checkpoint" (the run would start over in its own folder)."""
    from nanogpt.checkpoint import resume_state

    (tmp_path / "ckpt" / "00000005").mkdir(parents=True)  # a step folder without its train_state.pt
    for content in (b"\xff\xfe\x00 not text", b"00000005\n", b"../../elsewhere\n", b""):
        (tmp_path / "ckpt" / "latest").write_bytes(content)
        with pytest.raises(UserError, match=r"ckpt/latest is damaged: it names no complete checkpoint folder in "):
            resume_state(tmp_path, "scratch")


# -- safe loading --------------------------------------------------------------------------------

class Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_malicious_checkpoint_is_refused_and_does_not_run(tmp_path, data_root):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"model": {}, "model_args": {}, "x": Payload(str(marker))}, evil)
    proc = run(train_cmd(data_root, tmp_path / "run", f"init_from={evil}"), tmp_path)
    assert_clean_failure(proc, "refused")
    sample = run([sys.executable, str(ROOT / "sample.py"), f"init_from={evil}", "device=cpu"], tmp_path)
    assert_clean_failure(sample, "refused")
    assert not marker.exists()
    with open(evil, "rb") as f:  # the payload is real: plain pickle would have run it
        assert b"system" in f.read()


def test_a_pickled_vocabulary_is_not_read(tmp_path, data_root):
    """Data folders carry JSON only: a meta.pkl (nanoGPT's format) is never unpickled."""
    folder = tmp_path / "data" / "foreign"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (folder / "meta.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    proc = run(train_cmd(tmp_path / "data", tmp_path / "run", "data.name=foreign"), tmp_path)
    assert proc.returncode == 2 and not marker.exists()


# -- secrets ---------------------------------------------------------------------------------------

def test_tokens_in_the_environment_never_reach_the_run_folder(tmp_path, data_root):
    secrets = {"WANDB_API_KEY": "sentinel0123456789abcdef0123456789abcdef", "HF_TOKEN": "hf_sentinelsecret42"}
    run_dir = tmp_path / "run"
    proc = run(train_cmd(data_root, run_dir, "logger=wandb", "logger.wandb.mode=offline"), tmp_path, env=secrets)
    assert proc.returncode == 0, proc.stderr
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        content = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in content, f"{value} found in {path}"
    assert all(v not in proc.stdout + proc.stderr for v in secrets.values())
