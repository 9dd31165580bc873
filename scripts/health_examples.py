"""The examples of docs/reliability.md ("Long runs"), as markdown tables:

1. the weights' EMA in the stable phase of a warmup-stable-decay schedule: the CPU recipe with
   schedule=wsd and ema_decay=0.99, val loss of the weights and of their EMA at every eval;
2. a planted loss spike under each spike.policy: the CPU recipe for --spike-iters iterations, the
   loss of one batch (the windows of iteration --spike-at) multiplied by --factor, planted from
   outside the code by tests/faults.py's SPIKE_LOSS, as the tests do.

    python scripts/health_examples.py --out health_runs            # both, about 6 minutes on a quiet CPU
    python scripts/health_examples.py --out health_runs --reuse    # reprint from the finished runs
    python scripts/health_examples.py --out health_runs system.num_threads=1   # extra overrides for every run

Every run is `python train.py` in its own folder under --out.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from nanogpt.rundir import read_metrics, read_status

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from faults import spike  # noqa: E402  (the tests' fault, planted the same way)

# (spike.policy, overrides): each policy with the recipe's clipping, then without clipping, where
# the spike's gradient reaches AdamW whole
VARIANTS = [("off", []), ("warn", []), ("skip", []), ("rollback", []), ("off", ["grad_clip=0"]), ("skip", ["grad_clip=0"])]


def train(run_dir: Path, overrides: list[str], env: dict | None = None, reuse: bool = False) -> list[dict]:
    if not (reuse and read_status(run_dir).get("status") == "finished"):
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
        print("$", " ".join(cmd[1:]), file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=run_dir.parent, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return read_metrics(run_dir)


def ema_example(out: Path, extra: list[str], reuse: bool) -> None:
    records = train(out / "wsd_ema", ["schedule=wsd", "ema_decay=0.99", "eval_interval=100", *extra], reuse=reuse)
    lr = {r["iter"]: r["lr"] for r in records if r["kind"] == "train"}
    print("| iteration | phase | learning rate | val loss | val loss, EMA 0.99 | EMA - weights |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in records if r["kind"] == "eval"):
        rate = lr.get(r["iter"], lr.get(r["iter"] + 1, float("nan")))
        phase = "warmup" if r["iter"] <= 100 else "stable" if r["iter"] <= 1000 else "decay"
        print(f"| {r['iter']} | {phase} | {rate:.2e} | {r['val_loss']:.4f} | {r['val_loss_ema']:.4f} | "
              f"{r['val_loss_ema'] - r['val_loss']:+.4f} |")


def spike_example(out: Path, args, extra: list[str]) -> None:
    print(f"\nA planted spike: the loss of the batch of iteration {args.spike_at} x{args.factor:g}, "
          f"{args.spike_iters} iterations, checkpoints every 250\n")
    print("| spike.policy | what happened | train loss after it (iteration) | final val loss |")
    print("|---|---|---|---|")
    for policy, overrides in VARIANTS:
        name = "_".join([policy, *(o.replace("=", "") for o in overrides)])
        run_dir, fault = out / f"spike_{name}", out / f"fault_{name}"
        fault.mkdir(parents=True, exist_ok=True)
        env = spike(fault, args.spike_at, factor=args.factor)
        records = train(run_dir, [f"max_iters={args.spike_iters}", f"spike.policy={policy}", *overrides, *extra], env,
                        args.reuse)
        spikes = [r for r in records if r["kind"] == "spike"]
        happened = "; ".join(f"{s['action']} at {s.get('spike_iter', s['iter'])} (loss {s['loss']:.2f} > {s['threshold']:.2f})"
                             + (f", back to {s['iter']}, {s['windows_skipped']} batches skipped" if s["action"] == "rollback" else "")
                             for s in spikes) or "nothing: the spike passed unnoticed"
        train_loss = {r["iter"]: r["loss"] for r in records if r["kind"] == "train"}
        after = next((i for i in sorted(train_loss) if i > args.spike_at + 1), None)
        val = [r["val_loss"] for r in records if r["kind"] == "eval"][-1]
        print(f"| {' '.join([policy, *overrides])} | {happened} | {train_loss.get(after, float('nan')):.4f} ({after}) | {val:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="reprint from finished runs instead of training again")
    parser.add_argument("--spike-at", type=int, default=600)
    parser.add_argument("--spike-iters", type=int, default=1000)
    parser.add_argument("--factor", type=float, default=100.0)
    args, extra = parser.parse_known_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    ema_example(args.out, extra, args.reuse)
    spike_example(args.out, args, extra)


if __name__ == "__main__":
    main()
