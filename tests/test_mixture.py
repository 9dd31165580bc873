"""Data mixtures (data=mix): each source's share of the windows against binomial intervals, the
phase switch at its iteration, per-source val losses against a direct evaluation, what `inspect`
prints, bad input, and a mixture with phases trained: kill -9 and resume, 2 ranks against one."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import ROOT, TINY, compose_cfg, run_script
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import MixConfig, MixPhase, to_train_config
from nanogpt.errors import UserError
from nanogpt.data import main as data_main
from nanogpt.mixture import MixtureData
from nanogpt.model import GPT, GPTConfig
from nanogpt.plot import run_figures, sweep_figures
from nanogpt.prepare import prepare
from nanogpt.config import DataConfig
from nanogpt.rundir import read_metrics
from nanogpt.shards import read_shard
from nanogpt.sweep import job_row
from nanogpt.trainer import estimate_loss

ASSET = ROOT / "nanogpt" / "assets" / "tinyshakespeare.txt"
SOURCES = ["shakespeare_char", "mix_rev", "mix_sorted"]  # a preset, and two folders prepared here


@pytest.fixture(scope="module")
def root(data_root, tmp_path_factory):
    """data_root with the shakespeare_char preset and two folders of Tiny Shakespeare's alphabet:
    its lines in 100 files (documents) each reversed (mix_rev), each sorted (mix_sorted)."""
    lines = ASSET.read_text().splitlines(keepends=True)
    for name, change in (("mix_rev", lambda t: t[::-1]), ("mix_sorted", lambda t: "".join(sorted(t)))):
        src = tmp_path_factory.mktemp(name)
        for i in range(100):
            (src / f"{i:03d}.txt").write_text(change("".join(lines[i::100])))
        prepare(DataConfig(name=name, root=str(data_root), source=[str(src)]))
    MixtureData(MixConfig(root=str(data_root), mix={"shakespeare_char": 1})).prepare()
    return data_root


def mixture(root, mix, phases=(), **kw) -> MixtureData:
    return MixtureData(MixConfig(root=str(root), mix=mix, mix_phases=[MixPhase(u, w) for u, w in phases], **kw))


def loader_of(root, mix, phases=(), batch_size=10, **kw):
    return mixture(root, mix, phases, batch_size=batch_size).loader(block_size=32, device=torch.device("cpu"), seed=11,
                                                                    max_iters=2000, **kw)


@pytest.mark.parametrize("mix,phases", [
    ({"shakespeare_char": 3, "mix_rev": 1}, []),
    ({"shakespeare_char": 1, "mix_rev": 1, "mix_sorted": 2}, []),
    ({"shakespeare_char": 1, "mix_rev": 0}, [(0.4, {"mix_rev": 1})]),
    ({"shakespeare_char": 1, "mix_rev": 0, "mix_sorted": 2}, [(0.3, {"mix_rev": 1, "mix_sorted": 1}),
                                                              (0.55, {"shakespeare_char": 1})]),
])
def test_each_source_gets_its_share_of_20000_windows_and_phases_switch_at_their_iteration(root, mix, phases):
    """2000 iterations of 10 windows. A stretch of weights 0 and 1 must be drawn all from one
    source, to its first and last iteration: the switch is exactly at floor(until x max_iters)."""
    loader = loader_of(root, mix, phases)
    sources = np.stack([loader.train_sources(it, 0) for it in range(2000)])  # (iteration, window)
    ends = [math.floor(u * 2000) for u, _ in phases] + [2000]
    for start, end, weights in zip([0, *ends[:-1]], ends, [w for _, w in phases] + [mix]):
        drawn = sources[start:end].ravel()
        for k, name in enumerate(mix):
            p = weights.get(name, 0) / sum(weights.values())
            low, high = stats.binom.interval(0.999, drawn.size, p)
            assert low <= (drawn == k).sum() <= high, (name, start, end, p, (drawn == k).mean())
    # rank r of 2 draws global micro-step r of what one process draws with two micro-steps
    one = loader_of(root, mix, phases, micro_steps=2)
    for r in range(2):
        assert np.array_equal(loader_of(root, mix, phases, rank=r, world_size=2).train_sources(777, 0),
                              one.train_sources(777, r))


def test_epoch_order_deals_each_sources_windows_once_an_epoch_whatever_the_ranks(root):
    def loader(**kw):
        return mixture(root, {"mix_rev": 1, "mix_sorted": 1}, batch_size=16, order="epoch").loader(
            block_size=512, device=torch.device("cpu"), seed=2, max_iters=400, **kw)

    one = loader(micro_steps=2)
    taken = [one.train_starts(it, m) for it in range(150) for m in range(2)]  # 4,800 windows
    sources, ids = np.concatenate([s for s, _ in taken]), np.concatenate([i for _, i in taken])
    for k, part in enumerate(one.parts.values()):
        mine = ids[sources == k]
        assert len(mine) > part.epoch_windows  # past the first epoch: each window once in it
        assert np.array_equal(np.sort(mine[: part.epoch_windows]), np.sort(part.epoch(0)))
    ranks = [loader(rank=r, world_size=2) for r in range(2)]
    for it, m in ((0, 0), (149, 1)):  # rank r takes global micro-step r, counting the other rank's windows
        for got, want in zip(ranks[m].train_starts(it, 0), one.train_starts(it, m)):
            assert np.array_equal(got, want)


def direct_loss(model, path, split: str, seed: int, eval_iters: int, batch: int, block: int) -> float:
    """The mean loss of eval_iters batches of a folder's split, drawn as its documentation says an
    eval window is (a generator keyed (seed, 1 for eval, the split, k)) and cut from its shards here."""
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.concatenate([read_shard(path / f)[0] for f in meta["splits"][split]["shards"]]).astype(np.int64)
    losses = []
    for k in range(eval_iters):
        starts = np.random.default_rng([seed, 1, {"train": 0, "val": 1}[split], k]).integers(0, len(tokens) - block, batch)
        x = torch.from_numpy(np.stack([tokens[s : s + block] for s in starts]))
        y = torch.from_numpy(np.stack([tokens[s + 1 : s + block + 1] for s in starts]))
        losses.append(model(x, y)[1].item())
    return float(np.mean(losses))


def test_per_source_losses_are_each_source_evaluated_alone_and_the_mixtures_their_weighted_mean(root):
    data = mixture(root, {"shakespeare_char": 3, "mix_sorted": 1}, [(0.5, {"mix_sorted": 1})], batch_size=4)
    loader = data.loader(block_size=32, device=torch.device("cpu"), seed=5, max_iters=20)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = loader.train_batches(0)
    for _ in range(6):  # a few steps, so the sources' losses differ
        x, y = next(batches)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    batches.close()
    model.eval()
    with torch.no_grad():
        during_phase, after = (estimate_loss(model, loader, 3, nullcontext(), it) for it in (10, 11))
        for name in ("shakespeare_char", "mix_sorted"):
            for split in ("train", "val"):
                alone = direct_loss(model, data.paths[name], split, 5, 3, 4, 32)
                assert during_phase[f"{split}_loss/{name}"] == pytest.approx(alone, abs=1e-6)
                assert after[f"{split}_loss/{name}"] == during_phase[f"{split}_loss/{name}"]
    # evaluated at iteration 10, the last step was phase 1's (mix_sorted only); at 11, data.mix's
    assert during_phase["val_loss"] == during_phase["val_loss/mix_sorted"]
    assert after["val_loss"] == pytest.approx(0.75 * after["val_loss/shakespeare_char"] + 0.25 * after["val_loss/mix_sorted"])
    assert abs(after["val_loss/shakespeare_char"] - after["val_loss/mix_sorted"]) > 0.1


def test_inspect_prints_the_fractions_and_phases_of_a_fixture(root, capsys):
    """Half the iterations on one source, half on the other: exactly 50% of windows and tokens."""
    args = ["data=mix", f"data.root={root}", "data.mix={shakespeare_char:1,mix_rev:0}",
            "data.mix_phases=[{until:0.5,weights:{mix_rev:1}}]", "model=tiny", "max_iters=20", "iters=20",
            "gradient_accumulation_steps=2"]
    data_main(["nanogpt.data", "inspect", *args, "format=json"])  # in-process: the command's main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["fractions"] == {"windows": {"shakespeare_char": 0.5, "mix_rev": 0.5},
                                   "tokens": {"shakespeare_char": 0.5, "mix_rev": 0.5}}
    assert report["phases"] == [{"start": 0, "end": 10, "weights": {"shakespeare_char": 0.0, "mix_rev": 1.0}},
                                {"start": 10, "end": 20, "weights": {"shakespeare_char": 1.0, "mix_rev": 0.0}}]
    data_main(["nanogpt.data", "inspect", *args, "show=2"])  # the table, the phases, decoded windows
    text = capsys.readouterr().out
    assert "shakespeare_char           50.00%   50.00%" in text and "iterations 10-19: shakespeare_char 1.000" in text
    assert "--- window 1 of iteration 0 (mix_rev):" in text and "--- window 2" not in text


@pytest.mark.parametrize("overrides,message", [
    (["data.mix={shakespeare:1,nosuch:1}"], "data.mix.nosuch: not a data preset (conf/data/) nor a prepared folder"),
    (["data.mix={shakespeare:1,shakespeare_char:-0.5}"], "data.mix.shakespeare_char=-0.5 must be >= 0"),
    (["data.mix={shakespeare:inf,shakespeare_char:1}"], "data.mix.shakespeare=inf must be >= 0 and finite"),
    (["data.mix={shakespeare:0,shakespeare_char:0}"], "data.mix: every weight is 0"),
    (["data.mix={shakespeare:1}", "data.mix_phases=[{until:0.6,weights:{shakespeare:1}},{until:0.5,weights:{shakespeare:1}}]"],
     "data.mix_phases: until [0.6, 0.5] must increase"),
    (["data.mix={shakespeare:1}", "data.mix_phases=[{until:1.5,weights:{shakespeare:1}}]"],
     "data.mix_phases: until=1.5 is not in (0, 1]"),
])
def test_bad_mixtures_are_one_line_before_anything_is_prepared(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        to_train_config(compose_cfg("data=mix", f"data.root={tmp_path}", *overrides))
    if "nosuch" in overrides[0]:  # the whole command: exit 2, one line, the preset it names not prepared
        proc = run_script("train.py", "data=mix", f"data.root={tmp_path / 'fresh'}", *overrides, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}" + proc.stderr.split(message)[1].rstrip()]
        assert not (tmp_path / "fresh").exists()


def test_two_kinds_of_tokenizer_stop_a_mixture_before_anything_is_prepared(tmp_path):
    with pytest.raises(UserError, match=r"data.mix: shakespeare and shakespeare_char have different tokenizers \(gpt2, char\)"):
        mixture(tmp_path, {"shakespeare": 1, "shakespeare_char": 1}).prepare()
    assert not any(tmp_path.iterdir())


# -- a mixture with phases, trained -------------------------------------------------------------

TIMING = {"ms_per_iter", "tokens_per_s", "mfu", "train_time_s"}


def history(run_dir) -> list[dict]:
    """The run's records without what depends on timing or memory."""
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("mem_")} for r in read_metrics(run_dir)]


def mixture_args(root, run_dir) -> list[str]:
    return [*TINY, f"data.root={root}", f"hydra.run.dir={run_dir}", "data=mix", "data.mix={shakespeare_char:1,mix_rev:1}",
            "data.mix_phases=[{until:0.5,weights:{shakespeare_char:1}}]", "model.doc_mask=true", "max_iters=16",
            "eval_interval=4", "log_interval=1", "gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def straight(root, tmp_path_factory):
    """A mixture with a phase switch at iteration 8 and document masks, run straight through."""
    run_dir = tmp_path_factory.mktemp("mix") / "runs" / "straight"
    run_script("train.py", *mixture_args(root, run_dir), "logger=tensorboard", cwd=run_dir.parent.parent)
    return run_dir


@pytest.mark.slow
def test_a_mixture_run_records_its_phases_and_per_source_losses_everywhere(straight):
    from test_tracking import tensorboard_matches_metrics

    records = read_metrics(straight)
    assert [(r["iter"], r["mix/shakespeare_char"], r["mix/mix_rev"]) for r in records if r["kind"] == "data"] == \
        [(0, 1.0, 0.0), (8, 0.5, 0.5)]
    evals = [r for r in records if r["kind"] == "eval"]
    for r in evals:  # the mixture's own: the sources' weighted by what the last step trained on
        weight = 1.0 if r["iter"] <= 8 else 0.5
        assert r["val_loss"] == pytest.approx(weight * r["val_loss/shakespeare_char"] + (1 - weight) * r["val_loss/mix_rev"])
    log = (straight / "train.log").read_text()
    assert "iteration 8: data mix phase 2 of 2 (to iteration 16): shakespeare_char 0.500, mix_rev 0.500" in log
    # 8 iterations of 8 windows of 32 tokens from it alone, 8 from either: 75% of them, 96 x 32 tokens
    assert f"  shakespeare_char: 75.0% of the windows, {96 * 32 / 1_003_854:.3g} epochs of its 1,003,854 train tokens" in log
    tensorboard_matches_metrics(straight)  # the trackers get what metrics.jsonl holds
    scores = job_row(straight, straight.parent)["scores"]  # the sweep summary's columns
    assert scores == {"val_loss/shakespeare_char": evals[-1]["val_loss/shakespeare_char"],
                      "val_loss/mix_rev": evals[-1]["val_loss/mix_rev"]}
    plotted = {line.get_label(): list(line.get_ydata()) for line in run_figures(straight)["loss"].axes[0].lines}
    assert plotted["val loss: mix_rev"] == [r["val_loss/mix_rev"] for r in evals]
    panels = sweep_figures(straight.parent)["val_loss_sources"].axes
    assert [ax.get_ylabel() for ax in panels] == ["val_loss/shakespeare_char", "val_loss/mix_rev"]


@pytest.mark.slow
def test_kill_9_then_resume_under_a_mixture_with_phases_is_bit_identical(root, straight, tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *mixture_args(root, killed)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(5, 14)  # past the first checkpoint, before or after the switch
    t0 = time.monotonic()
    while not any(r["iter"] >= kill_after for r in read_metrics(killed)) and proc.poll() is None:
        assert time.monotonic() - t0 < 240, "no training progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script("train.py", *mixture_args(root, killed), cwd=tmp_path)
    assert "resuming at iteration" in resumed.stdout
    assert history(killed) == history(straight)
    a, b = load_checkpoint(straight / "ckpt.pt")["model"], load_checkpoint(killed / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ranks_train_a_mixture_as_one_process_does(root, straight, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *mixture_args(root, tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = history(straight), history(tmp_path / "ddp")
    assert [(r["iter"], r["kind"]) for r in one] == [(r["iter"], r["kind"]) for r in two]
    for a, b in zip(one, two):
        for key in a:
            if "loss" in key or key.startswith("mix/"):
                assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)
    wa, wb = load_checkpoint(straight / "ckpt.pt")["model"], load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
