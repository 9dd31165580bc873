"""Time to nanoGPT's val loss: the modern recipe against our nanoGPT-equivalent baseline, then the
ablation of each modern option; prints the tables of docs/modern_recipe.md (markdown).

    python scripts/modern_vs_baseline.py                          # 3 seeds, ablation included
    python scripts/modern_vs_baseline.py --ablation-seeds 1337    # ablation on one seed only
    python scripts/modern_vs_baseline.py --reuse                  # reprint from finished runs

Both recipes run on Shakespeare char at nanoGPT's CPU recipe size (4 layers, 4 heads, 128 wide,
block 64, batch 12), in this session, on the same data, CPU fp32, compile off, the same threads:
- baseline: the default run (model=mini, AdamW lr 1e-3, cosine over 2000 iterations). It keeps
  going at min_lr up to 2500 iterations (nanoGPT's schedule past lr_decay_iters), so a seed that
  ends just above the target at 2000 may still get there;
- modern: experiment=modern (model=modern, optim=muon, a 400-iteration warmup-stable-decay).
Every run is `python train.py` in its own folder under --out. Val loss is measured every 50
iterations on the seed's fixed windows (20 batches per eval); the clock is metrics.jsonl's
train_time_s, training time only, evals excluded. A recipe's time is the median over the seeds
of the time of its first eval at or below --target, a seed that never gets there counting as
infinitely late. Runs alternate baseline/modern per seed, so a busy phase of the machine hits
both.
The ablation flips one setting of the modern recipe at a time and reports val loss after its 400
iterations and at a fixed wall-clock budget (the modern recipe's median time to the target). Its
first row runs the modern recipe again, beside the variants, so that the wall-clock column
compares runs of one period of the machine.
"""

import argparse
import math
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt.rundir import read_metrics, read_status

ROOT = Path(__file__).resolve().parent.parent  # the nanogpt checkout: train.py, conf/

# how every run is measured: CPU fp32, compile off, val loss every 50 iterations, 20 batches
MEASURE = ["system=cpu", "eval_interval=50", "eval_iters=20", "log_interval=50"]
BASELINE = [*MEASURE, "max_iters=2500", "schedule.lr_decay_iters=2000"]
MODERN = ["experiment=ablation"]  # experiment=modern with MEASURE's settings
# one setting of the modern recipe flipped per row: (row name, overrides)
ABLATION = [
    ("modern recipe (all on)", []),
    ("learned positions, not rotary", ["model.pos_emb=learned"]),
    ("RMSNorm, not LayerNorm", ["model.norm=rmsnorm"]),
    ("no QK-norm", ["model.qk_norm=false"]),
    ("GELU, not ReLU²", ["model.activation=gelu"]),
    ("tied head", ["model.tie_embeddings=true"]),
    ("no logit soft-cap", ["model.logit_softcap=0"]),
    ("GPT-2 init, not zero-init", ["model.zero_init_proj=false"]),
    ("AdamW (lr 3e-3), not Muon", ["optim=adamw", "optim.learning_rate=3e-3"]),
    ("cosine, not WSD", ["schedule=cosine"]),
]


@dataclass
class Run:
    evals: list[tuple[int, float, float]]  # (iteration, val loss, training seconds so far)

    def first_below(self, target: float) -> tuple[int, float] | None:
        """(iteration, training seconds) of the first eval at or below target."""
        return next(((it, t) for it, loss, t in self.evals if loss <= target), None)

    def time_to(self, target: float) -> float | None:
        hit = self.first_below(target)
        return hit and hit[1]

    def val_at_time(self, budget_s: float) -> float | None:
        """Val loss of the last eval within budget_s seconds of training."""
        within = [loss for _, loss, t in self.evals if t <= budget_s]
        return within[-1] if within else None

    @property
    def final(self) -> tuple[int, float]:
        return self.evals[-1][0], self.evals[-1][1]

    @property
    def ms_per_iter(self) -> float:
        it, _, t = self.evals[-1]
        return 1000 * t / it


def train(run_dir: Path, overrides: list[str], seed: int, reuse: bool) -> Run:
    if not (reuse and read_status(run_dir).get("status") == "finished"):
        shutil.rmtree(run_dir, ignore_errors=True)
        args = [*overrides, f"system.seed={seed}", f"hydra.run.dir={run_dir}"]
        print(f"  python train.py {' '.join(args)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = read_metrics(run_dir)
    return Run([(r["iter"], r["val_loss"], r["train_time_s"]) for r in records if r["kind"] == "eval"])


def median(values: list[float | None]) -> float | None:
    """The median over the seeds. A missing value (a run that never reached the target, or had no
    eval within the budget) counts as infinitely late or bad, so one such seed of three still
    gives a median; None when the median itself is missing."""
    m = statistics.median([math.inf if v is None else v for v in values]) if values else math.inf
    return None if m == math.inf else m


def fmt(x: float | None, spec: str = ".3f", missing: str = "not reached") -> str:
    return missing if x is None else format(x, spec)


def headline(runs: dict[str, list[Run]], target: float) -> tuple[str, float | None]:
    """The comparison table and the modern recipe's median time to the target. A seed that never
    reaches the target gets there later than its whole training time, so the median of the seeds'
    times, those counted at their whole training time, bounds a censored median from below."""
    hits = {name: [r.first_below(target) for r in rs] for name, rs in runs.items()}
    med, exact = {}, {}
    for name, rs in runs.items():
        times = [r.time_to(target) for r in rs]
        med[name] = median(times)
        exact[name] = med[name] is not None
        if not exact[name]:
            med[name] = statistics.median(r.evals[-1][2] if t is None else t for t, r in zip(times, rs, strict=True))
    rows = [
        f"| recipe | time to val loss <= {target}, median (s) | per seed (s) | iterations | ms/iter | final val loss |",
        "|---|---|---|---|---|---|",
    ]
    commands = {"baseline": "`python train.py` (default run)", "modern": "`python train.py experiment=modern`"}
    for name, rs in runs.items():
        per_seed = ", ".join(fmt(r.time_to(target), ".1f", f"> {r.evals[-1][2]:.1f}") for r in rs)
        iters = ", ".join(str(h[0]) if h else f"> {r.final[0]}" for h, r in zip(hits[name], rs))
        finals = ", ".join(f"{r.final[1]:.3f} @ {r.final[0]}" for r in rs)
        ms = statistics.median(r.ms_per_iter for r in rs)
        shown = f"{med[name]:.1f}" if exact[name] else f"> {med[name]:.1f}"
        rows.append(f"| {name}: {commands[name]} | {shown} | {per_seed} | {iters} | {ms:.1f} | {finals} |")
    if not exact["modern"]:
        return "\n".join(rows), None
    ratio = med["modern"] / med["baseline"]
    if exact["baseline"]:
        rows.append(f"\nThe modern recipe needs {ratio:.0%} of the baseline's time ({1 / ratio:.2f}x faster).")
    else:
        rows.append(f"\nThe modern recipe needs less than {ratio:.0%} of the baseline's time (more than "
                    f"{1 / ratio:.2f}x faster); the baseline's median is a lower bound (\"> s\": not reached in that time).")
    return "\n".join(rows), med["modern"]


def ablation_table(runs: dict[str, list[Run]], budget_s: float, target: float) -> str:
    full = runs[ABLATION[0][0]]
    iters = full[0].final[0]
    ref_iters = median([r.final[1] for r in full])
    ref_budget = median([r.val_at_time(budget_s) for r in full])
    rows = [
        f"| variant | ms/iter | val loss @ {iters} iterations | change | val loss @ {budget_s:.1f} s | change "
        f"| time to {target} (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        at_iters = median([r.final[1] for r in rs])
        at_budget = median([r.val_at_time(budget_s) for r in rs])
        change_iters = None if at_iters is None or ref_iters is None else at_iters - ref_iters
        change_budget = None if at_budget is None or ref_budget is None else at_budget - ref_budget
        to_target = median([r.time_to(target) for r in rs])
        rows.append(
            f"| {name} | {statistics.median(r.ms_per_iter for r in rs):.1f} | {fmt(at_iters)} | {fmt(change_iters, '+.3f', '-')} "
            f"| {fmt(at_budget, '.3f', '-')} | {fmt(change_budget, '+.3f', '-')} | {fmt(to_target, '.1f')} |"
        )
    return "\n".join(rows)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=None, help="default: --seeds; none: no ablation")
    parser.add_argument("--target", type=float, default=1.886, help="nanoGPT's val loss at iteration 2000 on this machine kind")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "modern_vs_baseline")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out instead of training again")
    parser.add_argument("--threads", type=int, default=None,
                        help="system.num_threads of every run (default: train.py's, all CPUs); 1 on a busy machine, "
                        "where a thread of a parallel matmul waits for a descheduled peer")
    args = parser.parse_args()
    ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds
    out = args.out.absolute()
    done: dict[Path, Run] = {}  # this invocation's runs

    threads = [] if args.threads is None else [f"system.num_threads={args.threads}"]

    def run(name: str, overrides: list[str], seed: int) -> Run:
        run_dir = out / name / f"seed{seed}"
        if run_dir not in done:
            done[run_dir] = train(run_dir, [*overrides, *threads], seed, args.reuse)
        return done[run_dir]

    runs: dict[str, list[Run]] = {"baseline": [], "modern": []}
    for seed in args.seeds:
        runs["baseline"].append(run("baseline", BASELINE, seed))
        runs["modern"].append(run("modern", MODERN, seed))
    table, budget_s = headline(runs, args.target)
    print(f"\n{cpu_name()}, {args.threads or torch.get_num_threads()} threads, torch {torch.__version__}, seeds {' '.join(map(str, args.seeds))}\n")
    print(table)
    if not ablation_seeds:
        return
    if budget_s is None:
        sys.exit("\nno ablation: the modern recipe did not reach the target on every seed")
    abl: dict[str, list[Run]] = {}
    for seed in ablation_seeds:
        for i, (name, flip) in enumerate(ABLATION):
            abl.setdefault(name, []).append(run(f"ablation/{i}", [*MODERN, *flip], seed))
    print(f"\nAblation, median of seeds {' '.join(map(str, ablation_seeds))}: one setting of the modern recipe "
          f"flipped per row; the budget is the modern recipe's median time to {args.target}.\n")
    print(ablation_table(abl, budget_s, args.target))


if __name__ == "__main__":
    main()
