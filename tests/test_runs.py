"""`python -m nanogpt.runs` on real runs: finished, interrupted by SIGINT, killed by SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY
from nanogpt.rundir import METRICS, read_metrics, read_status


def start_training(run_dir, data_root, cwd) -> subprocess.Popen:
    """A tiny run long enough to be stopped while it trains."""
    args = [*TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}", "max_iters=100000", "eval_interval=100000"]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_training(run_dir, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the first progress record: the loop runs, with its signal handlers in place."""
    deadline = time.monotonic() + timeout
    while not (run_dir / METRICS).exists() or not (run_dir / METRICS).read_text():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_runs_lists_finished_interrupted_and_crashed_runs(train_run, tmp_path, data_root):
    outputs = tmp_path / "outputs"
    train_run(run_dir=outputs / "finished")
    interrupted = start_training(outputs / "interrupted", data_root, tmp_path)
    crashed = start_training(outputs / "crashed", data_root, tmp_path)
    try:
        wait_for_training(outputs / "interrupted", interrupted)
        wait_for_training(outputs / "crashed", crashed)
        interrupted.send_signal(signal.SIGINT)  # Ctrl-C: checkpoint, status interrupted, exit 130
        crashed.kill()  # SIGKILL: no chance to write anything
        assert interrupted.wait(timeout=120) == 128 + signal.SIGINT
        crashed.wait(timeout=60)
    finally:
        for proc in (interrupted, crashed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert read_status(outputs / "crashed")["status"] == "running"  # what a killed run leaves behind

    # no folder given: outputs/ and multirun/ of the working directory
    proc = subprocess.run([sys.executable, "-m", "nanogpt.runs"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:5] == ["started", "status", "iters", "best", "val"]
    by_folder = {row.split()[5]: row.split() for row in rows}  # started is two words: date and time
    assert set(by_folder) == {"outputs/finished", "outputs/interrupted", "outputs/crashed"}
    best = min(r["val_loss"] for r in read_metrics(outputs / "finished") if r["kind"] == "eval")
    assert by_folder["outputs/finished"][2:5] == ["finished", "20/20", f"{best:.4f}"]
    assert by_folder["outputs/interrupted"][2] == "interrupted"
    assert by_folder["outputs/crashed"][2] == "crashed"
    assert by_folder["outputs/interrupted"][3].endswith("/100000")
    assert "max_iters=100000" in by_folder["outputs/crashed"]  # the overrides close the line
