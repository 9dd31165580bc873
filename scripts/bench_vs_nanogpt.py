"""Side by side on this machine: our train.py against nanoGPT's, in one session, printing the
benchmark tables of docs/benchmark.md (markdown).

    python scripts/bench_vs_nanogpt.py /path/to/nanoGPT              # both workloads, 5 rounds
    python scripts/bench_vs_nanogpt.py /path/to/nanoGPT --only char --rounds 3 --char-iters 300

The path is a checkout of https://github.com/karpathy/nanoGPT (MIT); its Shakespeare char data
is prepared there with its own prepare.py on first use. Workloads, both on CPU:
- char: nanoGPT README's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0,
  fp32, compile off), full runs: step times and val loss at 250/500/1000/2000;
- baby: config/train_shakespeare_char.py (6/6/384, block 256, batch 64, dropout 0.2), a few
  iterations (a step takes seconds).
Each round runs ours with nanoGPT's settings, nanoGPT, then ours in our best CPU setting
(--fast, default system=cpu_fast), back to back, so a busy phase of the machine hits all three;
a ratio compares runs of one round, and the table gives the median ratio over the rounds with
its range. A run's step time is the median of its per-iteration times (both log every
iteration), its first iteration (evaluation, compilation) left out.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from nanogpt.config import TrainConfig, to_train_config
from nanogpt.device import resolve_dtype
from nanogpt.flops import flops_per_token, measure_matmul_flops
from nanogpt.model import GPT, GPTConfig
from nanogpt.prepare import prepare
from nanogpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parent.parent  # the nanogpt checkout: train.py, conf/

EVAL_ITERS = (250, 500, 1000, 2000)  # the char recipe's val losses docs/benchmark.md shows
NANO_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)
NANO_EVAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", re.M)


@dataclass
class Workload:
    name: str
    title: str
    model: dict  # for the FLOPs per token
    batch_size: int
    nanogpt: list[str]  # arguments of nanoGPT's train.py
    ours: list[str]  # overrides of our train.py


@dataclass
class Run:
    ms: list[float]  # per-iteration times, first iteration left out
    val_loss: dict[int, float]
    wall_s: float
    peak_rss_mib: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"ours": [], "nanogpt": [], "fast": []})


def workloads(char_iters: int, baby_iters: int) -> list[Workload]:
    return [
        Workload(
            "char",
            f"char CPU recipe (4/4/128, block 64, batch 12), {char_iters} iterations",
            dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
            12,
            ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
             "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
             "--n_embd=128", f"--max_iters={char_iters}", f"--lr_decay_iters={char_iters}", "--dropout=0.0"],
            ["experiment=shakespeare_char_cpu", "log_interval=1", f"max_iters={char_iters}",
             f"schedule.lr_decay_iters={char_iters}"],
        ),  # fmt: skip
        Workload(
            "baby",
            f"baby model (6/6/384, block 256, batch 64, dropout 0.2), {baby_iters} iterations",
            dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
            64,
            # nanoGPT runs iterations 0..max_iters and always evaluates at 0: one eval batch
            ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=1",
             "--eval_interval=1000000", "--log_interval=1", f"--max_iters={baby_iters - 1}"],
            ["experiment=shakespeare_char", "system=cpu", "eval_iters=1", "eval_interval=1000000",
             "log_interval=1", f"max_iters={baby_iters}"],
        ),  # fmt: skip
    ]


def run_process(cmd: list[str], cwd: Path) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MiB) of one process; raise with its output if it fails."""
    with tempfile.TemporaryFile("w+") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    return text, wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_nanogpt(nanogpt: Path, w: Workload, work: Path) -> Run:
    out_dir = work / "nanogpt-out"
    text, wall, rss = run_process([sys.executable, "train.py", *w.nanogpt, f"--out_dir={out_dir}"], nanogpt)
    shutil.rmtree(out_dir, ignore_errors=True)
    ms = [float(t) for i, t in NANO_ITER.findall(text) if int(i) > 0]  # iteration 0 holds the first eval
    val = {int(i): float(v) for i, v in NANO_EVAL.findall(text)}
    return Run(ms, val, wall, rss)


def run_ours(overrides: list[str], data_root: Path, work: Path) -> Run:
    run_dir = work / "ours-run"
    args = [*overrides, f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
    _, wall, rss = run_process([sys.executable, str(ROOT / "train.py"), *args], ROOT)
    records = read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    ms = [r["ms_per_iter"] for r in records if r["kind"] == "train" and r["iter"] > 1]
    val = {r["iter"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    return Run(ms, val, wall, rss)


def prepare_nanogpt_data(nanogpt: Path) -> None:
    """nanoGPT's own prepare.py on the Tiny Shakespeare this package ships (it would download it)."""
    folder = nanogpt / "data" / "shakespeare_char"
    if (folder / "train.bin").exists():
        return
    if not (folder / "prepare.py").exists():
        sys.exit(f"error: {nanogpt} is not a nanoGPT checkout (no data/shakespeare_char/prepare.py)")
    shutil.copy(ROOT / "nanogpt" / "assets" / "tinyshakespeare.txt", folder / "input.txt")
    run_process([sys.executable, "prepare.py"], folder)


def our_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=overrides))


def run_dtype(overrides: list[str]) -> str:
    """The dtype our train.py runs in with these overrides (system=cpu_fast picks it per machine)."""
    dtype = resolve_dtype(our_config(overrides).system, torch.device("cpu"))
    return str(dtype).removeprefix("torch.")


def matmul_peak(dtype: str) -> float:
    return measure_matmul_flops(torch.device("cpu"), getattr(torch, dtype), seconds=1.0)


def workload_flops_per_token(w: Workload) -> int:
    return flops_per_token(GPT(GPTConfig(**w.model, vocab_size=65)))


def ratio_cell(ours: list[Run], nano: list[Run]) -> str:
    ratios = [o.median_ms / n.median_ms for o, n in zip(ours, nano, strict=True)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def tables(w: Workload, res: Results, fast_label: str, fast_dtype: str, peaks: dict[str, float]) -> str:
    fpt = workload_flops_per_token(w)
    tokens = w.batch_size * w.model["block_size"]
    rounds = len(res.runs["nanogpt"])
    lines = [
        f"**{w.title}**, {rounds} rounds",
        "",
        f"| run | ms/iter (median) | vs nanoGPT: median ratio (range over {rounds} rounds) | MFU | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("nanogpt", "nanoGPT train.py (fp32, compile off)"),
                       ("ours", "ours, same settings"), ("fast", f"ours, {fast_label} ({fast_dtype})")):  # fmt: skip
        runs = res.runs[key]
        ms = statistics.median(r.median_ms for r in runs)
        ratio = "1.00x" if key == "nanogpt" else ratio_cell(runs, res.runs["nanogpt"])
        mfu = fpt * tokens / (ms / 1e3) / peaks[fast_dtype if key == "fast" else "float32"]
        wall = statistics.median(r.wall_s for r in runs)
        rss = statistics.median(r.peak_rss_mib for r in runs)
        lines.append(f"| {label} | {ms:.1f} | {ratio} | {mfu * 100:.1f}% | {wall:.1f} | {rss:,.0f} |")
    losses = {k: {i: statistics.median(r.val_loss[i] for r in runs) for i in EVAL_ITERS if all(i in r.val_loss for r in runs)}
              for k, runs in res.runs.items()}  # fmt: skip
    shown = [i for i in EVAL_ITERS if all(i in v for v in losses.values())]
    if shown:
        lines += ["", f"| val loss at iteration | nanoGPT | ours, same settings | ours, {fast_label} |", "|---|---|---|---|"]
        lines += [f"| {i} | {losses['nanogpt'][i]:.4f} | {losses['ours'][i]:.4f} | {losses['fast'][i]:.4f} |" for i in shown]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (ours, nanoGPT, ours fast)")
    parser.add_argument("--only", choices=("char", "baby"), help="one workload only")
    parser.add_argument("--char-iters", type=int, default=2000, help="iterations of each char run (2000: full runs)")
    parser.add_argument("--baby-iters", type=int, default=6, help="iterations of each baby run, the first untimed")
    parser.add_argument("--fast", nargs="*", default=["system=cpu_fast"], help="overrides of our best CPU setting")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    nanogpt = args.nanogpt.expanduser().resolve()
    prepare_nanogpt_data(nanogpt)
    fast_label = " ".join(args.fast)
    report, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-nanogpt-") as tmp:
        work = Path(tmp)
        prepare(our_config([f"data.root={work / 'data'}"]).data)
        # MFU's denominators: the matmul peak in each run's dtype, best of before and after
        fast_dtypes = {w.name: run_dtype(w.ours + args.fast) for w in workloads(args.char_iters, args.baby_iters)}
        dtypes = {"float32", *fast_dtypes.values()}
        before = {dtype: matmul_peak(dtype) for dtype in dtypes}
        for w in workloads(args.char_iters, args.baby_iters):
            if args.only and w.name != args.only:
                continue
            res = Results()
            for r in range(args.rounds):
                for key in ("ours", "nanogpt", "fast"):
                    if key == "nanogpt":
                        run = run_nanogpt(nanogpt, w, work)
                    else:
                        run = run_ours(w.ours + (args.fast if key == "fast" else []), work / "data", work)
                    res.runs[key].append(run)
                    print(f"[{w.name} round {r + 1}/{args.rounds}] {key}: {run.median_ms:.1f} ms/iter, "
                          f"{run.wall_s:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            raw[w.name] = {k: [vars(run) for run in runs] for k, runs in res.runs.items()}
            report.append((w, res))
        peaks = {dtype: max(before[dtype], matmul_peak(dtype)) for dtype in dtypes}
    shown = ", ".join(f"{dtype} {flops / 1e9:.0f}" for dtype, flops in sorted(peaks.items()))
    print(f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"measured matmul peaks (GFLOP/s, MFU's denominators): {shown}\n")  # fmt: skip
    for w, res in report:
        print(tables(w, res, fast_label, fast_dtypes[w.name], peaks) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peaks, "fast_dtypes": fast_dtypes, "runs": raw}, indent=1))


if __name__ == "__main__":
    main()
