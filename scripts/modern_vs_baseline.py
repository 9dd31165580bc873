"""Time to nanoGPT's val loss: the modern recipe against our nanoGPT-equivalent baseline, then the
ablation of each modern option; prints the tables of docs/modern_recipe.md (markdown).

    python scripts/modern_vs_baseline.py                          # 3 seeds, ablation included
    python scripts/modern_vs_baseline.py --ablation-seeds 1337    # ablation on one seed only
    python scripts/modern_vs_baseline.py --reuse                  # reprint from finished runs
    python scripts/modern_vs_baseline.py --no-headline            # the ablation alone

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
The ablation flips one setting of the modern recipe at a time; its table is the runs' cells
(nanogpt.cells, as `python -m nanogpt.sweep <out>/ablation --baseline experiment=ablation --target
1.886` prints them): per row the mean val loss after its 400 iterations with a 95% interval, the
change against the modern recipe (all on) with Welch's interval, p-value, Holm's adjusted p-value
over the rows and Cohen's d, the iterations and training seconds to the target (interpolated
between evaluations) and the one-sided p-value that the row's mean ends below the target. Its
first row runs the modern recipe again, beside the variants, so that the seconds compare runs of
one period of the machine.
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

from nanogpt.cells import Comparison, compare
from nanogpt.rundir import read_metrics, read_status
from nanogpt.stats import below_target
from nanogpt.sweep import job_row

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
    """The median over the seeds. A missing value (a run that never reached the target) counts as
    infinitely late, so one such seed of three still gives a median; None when the median itself
    is missing."""
    m = statistics.median([math.inf if v is None else v for v in values]) if values else math.inf
    return None if m == math.inf else m


def fmt(x: float | None, spec: str = ".3f", missing: str = "not reached") -> str:
    return missing if x is None else format(x, spec)


def headline(runs: dict[str, list[Run]], target: float) -> str:
    """The comparison table. A seed that never reaches the target gets there later than its whole
    training time, so the median of the seeds' times, those counted at their whole training time,
    bounds a censored median from below. The last column is modded-nanogpt's record rule: the
    one-sided t-test that the mean final val loss is below the target (a record needs p < 0.01)."""
    hits = {name: [r.first_below(target) for r in rs] for name, rs in runs.items()}
    med, exact = {}, {}
    for name, rs in runs.items():
        times = [r.time_to(target) for r in rs]
        med[name] = median(times)
        exact[name] = med[name] is not None
        if not exact[name]:
            med[name] = statistics.median(r.evals[-1][2] if t is None else t for t, r in zip(times, rs, strict=True))
    rows = [
        f"| recipe | time to val loss <= {target}, median (s) | per seed (s) | iterations | ms/iter | final val loss "
        f"| p(mean final < {target}) |",
        "|---|---|---|---|---|---|---|",
    ]
    commands = {"baseline": "`python train.py` (default run)", "modern": "`python train.py experiment=modern`"}
    for name, rs in runs.items():
        per_seed = ", ".join(fmt(r.time_to(target), ".1f", f"> {r.evals[-1][2]:.1f}") for r in rs)
        iters = ", ".join(str(h[0]) if h else f"> {r.final[0]}" for h, r in zip(hits[name], rs))
        finals = ", ".join(f"{r.final[1]:.3f} @ {r.final[0]}" for r in rs)
        ms = statistics.median(r.ms_per_iter for r in rs)
        shown = f"{med[name]:.1f}" if exact[name] else f"> {med[name]:.1f}"
        p = fmt(below_target([r.final[1] for r in rs], target), ".2g", "-")
        rows.append(f"| {name}: {commands[name]} | {shown} | {per_seed} | {iters} | {ms:.1f} | {finals} | {p} |")
    if not exact["modern"]:
        return "\n".join(rows)
    ratio = med["modern"] / med["baseline"]
    if exact["baseline"]:
        rows.append(f"\nThe modern recipe needs {ratio:.0%} of the baseline's time ({1 / ratio:.2f}x faster).")
    else:
        rows.append(f"\nThe modern recipe needs less than {ratio:.0%} of the baseline's time (more than "
                    f"{1 / ratio:.2f}x faster); the baseline's median is a lower bound (\"> s\": not reached in that time).")
    return "\n".join(rows)


def ablation_table(runs: dict[str, list[Run]], folders: dict[str, list[Path]], target: float) -> str:
    """One row per variant from the cells of its runs (folders: variant -> its run folders)."""
    rows = [job_row(run_dir, run_dir.parent.parent) for run_dirs in folders.values() for run_dir in run_dirs]
    _, cells = compare(rows, Comparison(baseline=" ".join(MODERN), target=target))
    shared = set(next(c for c in cells if c["baseline"])["overrides"].split())
    by_flip = {frozenset(set(c["overrides"].split()) - shared): c for c in cells}
    iters = runs[ABLATION[0][0]][0].final[0]
    table = [
        f"| variant | n | ms/iter | val loss @ {iters} iterations | change | p | p (Holm) | d "
        f"| iterations to {target} | time to {target} (s) | p(mean < {target}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, flip in ABLATION:
        c = by_flip[frozenset(flip)]
        m = "final_val_loss"
        change = "" if c["baseline"] else interval(c, f"{m}/diff", f"{m}/diff_ci", "+.3f")
        p_values = ["", ""] if c["baseline"] else [fmt(c[f"{m}/p_value"], ".2g", "-"), fmt(c[f"{m}/p_holm"], ".2g", "-")]
        reached = f"{c['reached']}/{c['n']} reached" if c["reached"] < c["n"] else None
        table.append(
            f"| {name} | {c['n']} | {statistics.median(r.ms_per_iter for r in runs[name]):.1f} "
            f"| {interval(c, f'{m}/mean', f'{m}/ci')} | {change} | {' | '.join(p_values)} "
            f"| {'' if c['baseline'] else fmt(c[f'{m}/effect_size'], '+.1f', '-')} "
            f"| {reached or interval(c, 'iters_to_target/mean', 'iters_to_target/ci', '.0f')} "
            f"| {reached or interval(c, 'time_to_target_s/mean', 'time_to_target_s/ci', '.1f')} "
            f"| {fmt(c[f'{m}/p_target'], '.2g', '-')} |"
        )
    return "\n".join(table)


def interval(cell: dict, value: str, ci: str, spec: str = ".3f") -> str:
    """'1.812 [1.790, 1.834]': a value with its 95% interval (the value alone for one run)."""
    low, high = cell.get(f"{ci}_low"), cell.get(f"{ci}_high")
    bounds = "" if low is None else f" [{low:{spec}}, {high:{spec}}]"
    return fmt(cell.get(value), spec, "-") + bounds


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
    parser.add_argument("--no-headline", action="store_true", help="the ablation only, not the recipes' comparison")
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
    for seed in [] if args.no_headline else args.seeds:
        runs["baseline"].append(run("baseline", BASELINE, seed))
        runs["modern"].append(run("modern", MODERN, seed))
    if runs["baseline"]:
        print(f"\n{cpu_name()}, {args.threads or torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"seeds {' '.join(map(str, args.seeds))}\n")
        print(headline(runs, args.target))
    if not ablation_seeds:
        return
    abl: dict[str, list[Run]] = {}
    folders: dict[str, list[Path]] = {}
    for seed in ablation_seeds:
        for i, (name, flip) in enumerate(ABLATION):
            abl.setdefault(name, []).append(run(f"ablation/{i}", [*MODERN, *flip], seed))
            folders.setdefault(name, []).append(out / f"ablation/{i}" / f"seed{seed}")
    print(f"\nAblation, seeds {' '.join(map(str, ablation_seeds))}: one setting of the modern recipe flipped per row; "
          f"mean [95% interval]; change, p (Welch) and d against the first row.\n")
    print(ablation_table(abl, folders, args.target))

if __name__ == "__main__":
    main()
