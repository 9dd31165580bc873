"""Loss spikes planted from outside the code (tests/faults.py: one micro-batch's loss x10):
skip leaves the weights and optimizer state as they were, and 2 ranks agree when only one rank's
loss spikes; rollback goes back to the checkpoint, skips the windows, and a kill -9 and resume
reproduce it. warn is checked on tests/test_averaging.py's run."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY
from faults import spike
from nanogpt.checkpoint import TrainState, load_checkpoint, model_from_state
from nanogpt.config import SpikeConfig
from nanogpt.distributed import DistInfo
from nanogpt.errors import Diverged
from nanogpt.rundir import read_metrics, read_status
from nanogpt.spikes import Spike, SpikeMonitor

pytestmark = pytest.mark.slow

SPIKE_AT = 12  # the windows of iteration 12: the step that completes iteration 13
ARGS = ["max_iters=20", "schedule.lr_decay_iters=20", "log_interval=1", "spike.window=8"]


def command(data_root, run_dir, *overrides, nproc: int = 0) -> list[str]:
    launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / "train.py"), *TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *ARGS,
            *overrides]


def run(cmd, cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def optimizer_tensors(saved: dict) -> dict:
    return {(name, k): v for name, state in saved["optimizers"]["state"].items() for k, v in state.items()}


def test_two_ranks_skip_the_update_when_one_ranks_loss_spikes(tmp_path, data_root):
    """Rank 1's loss spikes, rank 0's does not: both skip (rank 0 saves), so the checkpoint after
    the spike holds the weights and optimizer state of the one before, exactly."""
    run_dir = tmp_path / "run"
    run(command(data_root, run_dir, "spike.policy=skip", "gradient_accumulation_steps=2", "max_iters=14", "eval_interval=1",
                "keep_checkpoints=3", nproc=2), tmp_path, spike(tmp_path, SPIKE_AT, micro_step=1))
    spikes = [r for r in read_metrics(run_dir) if r["kind"] == "spike"]
    assert [(r["iter"], r["action"], r["ranks"]) for r in spikes] == [(SPIKE_AT + 1, "skip", [1])]
    before, after, next_ = (load_checkpoint(run_dir / f"ckpt-{n:08d}.pt") for n in (SPIKE_AT, SPIKE_AT + 1, SPIKE_AT + 2))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    a, b = optimizer_tensors(before), optimizer_tensors(after)
    assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert not all(torch.equal(after["model"][k], next_["model"][k]) for k in after["model"])  # training goes on
    assert read_status(run_dir)["spikes"] == 1


def test_rollback_restarts_at_the_checkpoint_past_the_spikes_windows_and_resumes_exactly(tmp_path, data_root):
    args = ["spike.policy=rollback", "eval_interval=5", "keep_checkpoints=3"]
    env = spike(tmp_path, SPIKE_AT)
    straight = tmp_path / "straight"
    run(command(data_root, straight, *args), tmp_path, env)
    records = read_metrics(straight)
    rollbacks = [r for r in records if r["kind"] == "spike"]
    # one rollback: had the windows not been skipped, the planted spike would come back every time
    assert [(r["iter"], r["spike_iter"], r["windows_skipped"], r["action"]) for r in rollbacks] == [(10, 13, 3, "rollback")]
    assert load_checkpoint(straight / "ckpt.pt")["skipped_windows"] == [[10, 3]]
    assert read_status(straight)["status"] == "finished"
    train = [r["iter"] for r in records if r["kind"] == "train"]
    assert train == list(range(1, 21))  # the abandoned iterations 11-13 cut from metrics.jsonl
    assert records.index(rollbacks[0]) == next(i for i, r in enumerate(records) if r["iter"] == 11) - 1

    # iteration 10 again, from the checkpoint's weights, on the windows of iteration 13
    from nanogpt.config import build

    kept = load_checkpoint(straight / "ckpt-00000010.pt")
    model = model_from_state(kept)
    config_data = build(_data_config(data_root))
    x, y = next(iter(config_data.loader(block_size=32, device=torch.device("cpu"), seed=1337).train_batches(13)))
    with torch.no_grad():
        hand = model(x, y)[1].item()
    assert next(r["loss"] for r in records if r["iter"] == 11 and r["kind"] == "train") == pytest.approx(hand, abs=1e-6)

    # killed anywhere from before the spike to after the next checkpoint, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(data_root, killed, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    kill_after = random.Random().randint(11, 18)
    t0 = time.monotonic()
    while not any(r["iter"] >= kill_after and r["kind"] == "train" for r in read_metrics(killed)) and proc.poll() is None:
        assert time.monotonic() - t0 < 240
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(command(data_root, killed, *args), tmp_path, env)
    history = lambda d: [(r["iter"], r["kind"], r.get("loss"), r.get("val_loss")) for r in read_metrics(d)]
    assert history(killed) == history(straight), kill_after
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(killed / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["spikes"] == b["spikes"]


def _data_config(data_root):
    from conftest import compose_cfg
    from nanogpt.config import to_train_config

    return to_train_config(compose_cfg(*TINY, f"data.root={data_root}")).data


def test_the_monitor_judges_against_its_window_and_stops_after_max_rollbacks(tmp_path):
    """mean + sigma x std of the last `window` non-spike losses (population std, numpy's), nothing
    judged until the window is full, a spike kept out of it; one rollback past the limit stops."""
    import numpy as np

    monitor = SpikeMonitor(SpikeConfig(policy="skip", window=4, sigma=3.0), DistInfo())
    losses = [4.0, 3.9, 3.95, 3.8, 3.85, 9.0, 3.7, float("nan"), 3.75]
    verdicts = [monitor.judge(i + 1, torch.tensor(v)) for i, v in enumerate(losses)]
    assert [i for i, v in enumerate(verdicts) if v is not None] == [5]
    window = [torch.tensor(v).item() for v in (3.9, 3.95, 3.8, 3.85)]  # before the spike, as float32 losses
    assert verdicts[5].threshold == pytest.approx(np.mean(window) + 3 * np.std(window), abs=1e-12)
    assert list(monitor.window) == pytest.approx([3.8, 3.85, 3.7, 3.75])  # neither the spike nor the NaN

    from nanogpt.config import TrainConfig
    from nanogpt.trainer import roll_back

    state = TrainState(spikes=[{"action": "rollback"}] * 3)
    with pytest.raises(Diverged, match="stopped after 3 rollbacks .spike.max_rollbacks=3."):
        roll_back(Spike(13, [0], 40.0, 4.4), TrainConfig(), state, None, None, tmp_path, DistInfo())
