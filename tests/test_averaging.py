"""Weight averages: the EMA against a hand loop over the saved weights, its exact resume in both
checkpoint formats and under FSDP, every command reading it (weights=ema); keep_checkpoints
through a kill -9 mid-save; `average` against numpy. One trained run is checked every way (with a
planted loss spike, which spike.policy=warn reports: tests/test_spikes.py has the other policies)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY
from faults import PAUSE_BEFORE_PRUNE, spike
from nanogpt.averaging import named_parameters
from nanogpt.checkpoint import (Checkpointer, average, consolidate, has_ema, kept_checkpoints, load_checkpoint, load_model,
                                main, model_from_state, read_checkpoint, weights_file)
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError
from nanogpt.rundir import read_metrics, read_status

pytestmark = pytest.mark.slow

# 2 micro-steps (one a rank on 2 ranks); the EMA from iteration 5 on; a warned spike at iteration 12
ARGS = ["gradient_accumulation_steps=2", "max_iters=20", "schedule.lr_decay_iters=20", "log_interval=1",
        "ema_decay=0.9", "ema_start=5", "spike.policy=warn", "spike.window=8"]
EVERY_ITERATION = ["eval_interval=1", "keep_checkpoints=16"]  # the weights of iterations 5..20 kept
BPB = ["eval=[bpb]", "eval.tasks.bpb.tokens=256"]  # eval.ema=true: scored on both weights, at 10 and 20
SPIKE_AT = 12


def command(data_root, run_dir, *overrides, nproc: int = 0) -> list[str]:
    launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / "train.py"), *TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *ARGS,
            *overrides]


def train(data_root, run_dir, *overrides, env=None, nproc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(data_root, run_dir, *overrides, nproc=nproc), cwd=run_dir.parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root) -> Path:
    """The run every test here reads: EMA, a checkpoint every iteration, 16 kept, a warned spike."""
    folder = tmp_path_factory.mktemp("averaging")
    train(data_root, folder / "run", *EVERY_ITERATION, *BPB, "eval.interval=10", "eval.ema=true", env=spike(folder, SPIKE_AT))
    return folder / "run"


def weights(path: Path) -> tuple[dict, dict]:
    """A checkpoint's weights and EMA, parameters only (a tied head once)."""
    saved = load_checkpoint(path)
    return {k: saved["model"][k] for k in saved["ema"]}, saved["ema"]


def test_the_ema_is_a_hand_loop_over_the_saved_weights(run, tiny_config):
    kept = kept_checkpoints(run)
    assert list(kept) == list(range(5, 21)) and kept[20].samefile(run / "ckpt.pt")
    w5, ema5 = weights(kept[5])
    assert all(torch.equal(ema5[k], w5[k]) for k in w5)  # at ema_start: the weights themselves
    hand = {k: v.double().numpy() for k, v in w5.items()}
    for n in range(6, 21):
        w, ema = weights(kept[n])
        hand = {k: 0.9 * hand[k] + 0.1 * w[k].double().numpy() for k in hand}
        assert max(np.abs(ema[k].double().numpy() - hand[k]).max() for k in hand) < 1e-6, n

    # val_loss_ema: the EMA's loss on the eval batches; the weights' own until ema_start
    evals = {r["iter"]: r for r in read_metrics(run) if r["kind"] == "eval"}
    assert all(evals[n]["val_loss_ema"] == evals[n]["val_loss"] for n in range(1, 6))
    assert all(evals[n]["val_loss_ema"] != evals[n]["val_loss"] for n in range(7, 21))
    config = tiny_config(*ARGS)
    from nanogpt.config import build

    loader = build(config.data).loader(block_size=32, device=torch.device("cpu"), seed=config.system.seed)
    model = model_from_state(read_checkpoint(kept[20]), weights="ema").eval()
    with torch.no_grad():
        hand_loss = np.mean([model(x, y)[1].item() for x, y in loader.eval_batches("val", config.eval_iters)])
    assert evals[20]["val_loss_ema"] == pytest.approx(hand_loss, abs=1e-6)


def test_warn_reports_the_planted_spike_and_trains_on(run):
    spikes = [r for r in read_metrics(run) if r["kind"] == "spike"]
    assert len(spikes) == 1 and spikes[0]["iter"] == SPIKE_AT + 1 and spikes[0]["action"] == "warn"
    assert spikes[0]["loss"] > spikes[0]["threshold"] and spikes[0]["ranks"] == [0]
    train = {r["iter"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    assert train[SPIKE_AT + 1] == spikes[0]["loss"] and max(train.values()) == train[SPIKE_AT + 1]
    status = read_status(run)
    assert status["status"] == "finished" and status["spikes"] == 1 and status["last_spike"] == spikes[0]
    assert f"loss spike at iteration {SPIKE_AT + 1}: " in (run / "train.log").read_text()


def test_average_is_the_exact_mean_and_every_command_reads_it(run, tmp_path, capsys):
    out = average(run, tmp_path / "avg.pt", last=3)
    saved = load_checkpoint(out)
    assert saved["averaged_iters"] == [18, 19, 20] and "optimizers" not in saved
    last3 = [load_checkpoint(run / f"ckpt-{n:08d}.pt")["model"] for n in (18, 19, 20)]
    for k, v in saved["model"].items():
        mean = np.mean(np.stack([w[k].double().numpy() for w in last3]), axis=0).astype(np.float32)
        assert np.array_equal(v.numpy(), mean), k
    model, meta = load_model(str(out))  # init_from, sample.py, nanogpt.eval and export read it so
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items()) and meta["vocab_size"] == 65
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_model(str(out), weights="ema")

    main(["average", str(run), str(tmp_path / "iters.pt"), "--iters", "18,19,20"])
    assert all(torch.equal(v, saved["model"][k]) for k, v in load_checkpoint(tmp_path / "iters.pt")["model"].items())
    capsys.readouterr()
    for args, message in [(["--last", "17"], "kept 16 checkpoint(s) (5, 6, "), (["--iters", "3,20"], "of iteration 3 ")]:
        with pytest.raises(SystemExit) as e:
            main(["average", str(run), str(tmp_path / "no.pt"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no.pt").exists()


def test_sample_export_and_init_from_read_the_ema(run, tmp_path, tiny_config):
    from nanogpt.export import export
    from nanogpt.sampling import Sampling, generate
    from nanogpt.tokenizer import tokenizer_from_meta
    from nanogpt.trainer import build_model

    ema_model = model_from_state(read_checkpoint(run / "ckpt.pt"), weights="ema")
    ema = {k: p.detach() for k, p in named_parameters(ema_model).items()}
    assert not all(torch.equal(v, load_checkpoint(run / "ckpt.pt")["model"][k]) for k, v in ema.items())

    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"init_from={run}", "weights=ema", "num_samples=2",
                           "max_new_tokens=30", "device=cpu", "format=json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    texts = [json.loads(line)["text"] for line in proc.stdout.splitlines()]
    tokenizer = tokenizer_from_meta(load_checkpoint(run / "ckpt.pt")["meta"])
    rows = generate(ema_model.eval(), [tokenizer.encode("\n")], 2, 30, Sampling(temperature=0.8, top_k=200, seed=1337))
    assert texts == [tokenizer.decode(r.tokens) for r in rows]

    # the eval command scores the EMA as training's eval.ema=true did
    from nanogpt.eval import evaluate

    tasks = {r["iter"]: r for r in read_metrics(run) if r["kind"] == "tasks"}
    assert list(tasks) == [10, 20] and tasks[20]["bpb_ema"] != tasks[20]["bpb"]
    for weights_, key in (("ema", "bpb_ema"), ("raw", "bpb")):
        result = evaluate(tiny_config(f"init_from={run / 'ckpt.pt'}", f"weights={weights_}", *BPB), None)
        assert result["scores"]["bpb"] == pytest.approx(tasks[20][key], abs=1e-6), weights_

    export(run, tmp_path / "hf", weights="ema")
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "hf" / "model.safetensors")["transformer.wte.weight"],
                       ema["transformer.wte.weight"])
    meta = load_checkpoint(run / "ckpt.pt")["meta"]
    started = build_model(tiny_config(f"init_from={run}", "weights=ema"), meta, saved=None)
    assert all(torch.equal(p, ema[k]) for k, p in named_parameters(started).items())


def test_a_kill_mid_save_keeps_complete_checkpoints_and_the_resume_is_bit_identical(run, tmp_path, data_root):
    """Killed after a save's link, before the oldest kept one goes: every checkpoint there loads
    (one more than K); the resume keeps exactly K and ends bit-identical to the unbroken run,
    EMA and spike window included. A kill before the link is test_a_checkpoint_killed_before_its_link."""
    killed = tmp_path / "killed"
    cmd = command(data_root, killed, *EVERY_ITERATION)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spike(tmp_path, SPIKE_AT, also=PAUSE_BEFORE_PRUNE)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not (killed / "prune.paused").exists():
        assert time.monotonic() - t0 < 240 and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = sorted(p.name for p in killed.glob("ckpt*.pt"))
    assert files == [f"ckpt-{n:08d}.pt" for n in range(1, 18)] + ["ckpt.pt"]  # 17 = K + 1: nothing removed yet
    assert all(load_checkpoint(killed / f)["iter_num"] >= 1 for f in files)

    train(data_root, killed, *EVERY_ITERATION, env=spike(tmp_path, SPIKE_AT))
    assert list(kept_checkpoints(killed)) == list(range(5, 21))
    for n in (5, 17, 20):
        a, b = load_checkpoint(run / f"ckpt-{n:08d}.pt"), load_checkpoint(killed / f"ckpt-{n:08d}.pt")
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (n, key)
        assert a["spike_windows"] == b["spike_windows"] and a["spikes"] == b["spikes"]
    history = lambda d: [(r["iter"], r["kind"], r.get("loss"), r.get("val_loss_ema")) for r in read_metrics(d)
                         if r["kind"] != "tasks"]  # the shared run scores bpb too
    assert history(killed) == history(run)


def test_a_checkpoint_killed_before_its_link_is_kept(run, tmp_path):
    """A kill between ckpt.pt's rename and its ckpt-<iteration>.pt link: the listing still has
    it, and the next start links it and keeps the last K; a half-written temporary file goes."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "ckpt-00000020.pt").unlink()
    (copy / ".ckpt-00000021.pt.tmp").write_bytes(b"half")
    assert list(kept_checkpoints(copy)) == list(range(5, 21))
    Checkpointer(copy, None, [], None, DistInfo(), keep=3)  # what a start does first
    assert sorted(p.name for p in copy.glob("*ckpt*")) == [f"ckpt-{n:08d}.pt" for n in (18, 19, 20)] + ["ckpt.pt"]
    assert (copy / "ckpt-00000020.pt").samefile(copy / "ckpt.pt")


def test_sharded_ema_resumes_exactly_and_follows_one_process(run, tmp_path, data_root):
    """One FSDP rank is bit-identical to one process: its step folders (EMA shards, last 2 kept)
    resumed by one process end exactly where the unbroken run ends; resumed on 2 ranks (resharded)
    its EMA follows it to 1e-4. Step folders average as files do; consolidation keeps the EMA."""
    env = spike(tmp_path, SPIKE_AT)
    first = tmp_path / "first"
    train(data_root, first, "system.parallelism=fsdp", "max_iters=10", "eval_interval=5", "keep_checkpoints=2", nproc=1)
    assert sorted(p.name for p in (first / "ckpt").iterdir()) == ["00000005", "00000010", "latest"]
    assert has_ema(read_checkpoint(weights_file(first)))
    mean = load_checkpoint(average(first, tmp_path / "avg.pt", last=2))["model"]
    halves = [model_from_state(read_checkpoint(first / "ckpt" / f"{n:08d}")).state_dict() for n in (5, 10)]
    assert all(np.array_equal(v.numpy(), ((halves[0][k].double() + halves[1][k].double()) / 2).float().numpy())
               for k, v in mean.items())

    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        shutil.copytree(first, folder)
    train(data_root, one, "eval_interval=5", env=env)
    final_a, final_b = load_checkpoint(run / "ckpt.pt"), load_checkpoint(one / "ckpt.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(final_a[key][k], final_b[key][k]) for k in final_a[key]), key

    train(data_root, two, "system.parallelism=fsdp", "eval_interval=5", env=env, nproc=2)
    sharded = read_checkpoint(weights_file(two))
    ema = {k: p.detach() for k, p in named_parameters(model_from_state(sharded, weights="ema")).items()}
    for k, v in ema.items():
        torch.testing.assert_close(v, final_a["ema"][k], atol=1e-4, rtol=0)
    # at another world size a rank's loss is another batch's: its window starts again, too short to judge yet
    assert [r["iter"] for r in read_metrics(one) if r["kind"] == "spike"] == [SPIKE_AT + 1]
    assert not [r for r in read_metrics(two) if r["kind"] == "spike"] and read_checkpoint(weights_file(two))["spike_windows"]
    whole = load_checkpoint(consolidate(two, tmp_path / "whole.pt"))
    assert all(torch.equal(whole["ema"][k], v) for k, v in ema.items())
