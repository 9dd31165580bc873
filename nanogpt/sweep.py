"""Sweep summaries: one row per job of a multirun, built from the jobs' own files.

Each job folder holds .hydra/overrides.yaml (what the job ran with), status.json (finished, failed
with its error, interrupted, preempted) and metrics.jsonl (losses, speed, the eval group's scores).
The summary is summary.csv in the sweep folder plus a printed table, best val loss first (or by
any column: --sort hellaswag/acc_norm), with a column for each task metric's last value, the model's
size and budget (from its start record) and the tokens and FLOPs it trained on. It is written

- by SweepSummary.on_multirun_end, when every job returned;
- by write_pending() in train.py's `finally`: Hydra skips on_multirun_end when a job failed
  (the sweeper re-raises the first failure, the submitit launcher raises for a job that died);
- on demand, for any sweep folder, finished or still running:
      python -m nanogpt.sweep multirun/2026-11-25/10-00-00 [--sort bpb]

A sweep of budgeted runs (flops_budget, tokens_per_param) also gets its scaling laws at its end
(nanogpt/scaling.py reads the summary).
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nanogpt.rundir import read_metrics, read_status, task_scores, write_status
from nanogpt.runs import describe

SUMMARY = "summary.csv"
SIZE = ["params", "params_non_embedding", "flops_per_token", "tokens_per_param", "flops_budget"]  # its start record's
COLUMNS = ["job", "status", "best_val_loss", "final_val_loss", "iters", "tokens_per_s", "wall_s", *SIZE, "tokens", "flops",
           "overrides", "error"]

_NO_ERROR = {  # what a status without an error message means
    "unknown": "no status.json: the job stopped before training (see its log)",
    "crashed": "its process is gone without a status (killed? out of memory?)",
}
_pending: set[Path] = set()  # sweeps started in this process and not summarised yet


class SweepSummary(Callback):
    """Hydra callback, registered under hydra.callbacks in conf/config.yaml."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)  # a sweeper may store files before any job: Optuna's study
        _pending.add(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_pending()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A job that failed before training started (a wrong setting) has no status.json:
        record its error there so the summary shows it. Runs with the job, on its node."""
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and not read_status(run_dir):
            error = job_return._return_value  # the public property re-raises it
            write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}")


def write_pending() -> None:
    """Summarise the sweeps this process started and has not summarised yet."""
    from nanogpt.scaling import after_sweep  # matplotlib and scipy: loaded only at a sweep's end

    while _pending:
        sweep_dir = _pending.pop()
        print(write_summary(sweep_dir))
        report = after_sweep(sweep_dir)  # a sweep of budgeted runs: scaling.json, scaling.png
        if report:
            print(report)


def write_summary(sweep_dir: Path, sort: str | None = None) -> str:
    """Write <sweep_dir>/summary.csv; return the table to print."""
    rows = summarize(Path(sweep_dir), sort)
    scores = score_columns(rows)
    with open(Path(sweep_dir) / SUMMARY, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS[:4] + scores + COLUMNS[4:])
        writer.writeheader()
        for row in rows:
            fields = {k: v for k, v in row.items() if k != "scores"}
            writer.writerow({**fields, **row["scores"], "overrides": " ".join(row["overrides"])})
    return f"sweep {sweep_dir}: {len(rows)} jobs, summary in {SUMMARY}\n{format_table(rows)}"


def summarize(sweep_dir: Path, sort: str | None = None) -> list[dict[str, Any]]:
    """One row per job folder (any folder where Hydra saved a job's overrides), best first by
    `sort` (default: best val loss; accuracies high first, losses and bpb low first)."""
    rows = [job_row(p.parent.parent, sweep_dir) for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    key = sort or "best_val_loss"
    sign = -1 if "acc" in key else 1

    def order(r):
        value = r["scores"].get(key, r.get(key))
        return value is None, sign * value if value is not None else 0.0, _natural(r["job"])

    return sorted(rows, key=order)


def score_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The task metrics any job recorded, in the order first met."""
    return list(dict.fromkeys(k for r in rows for k in r["scores"]))


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    run = describe(job_dir)  # status (crashed when its process is gone), iterations, best val loss, overrides
    status = read_status(job_dir)
    metrics = read_metrics(job_dir)
    val = [m["val_loss"] for m in metrics if m.get("kind") == "eval"]
    tasks = [m for m in metrics if m.get("kind") == "tasks"]
    scores = task_scores(tasks[-1]) if tasks else {}
    speed = [m["tokens_per_s"] for m in metrics if m.get("kind") == "train"]
    start = next((m for m in reversed(metrics) if m.get("kind") == "start"), {})
    spent = next((m for m in reversed(metrics) if "flops" in m), {})  # the last record: tokens and FLOPs trained
    end = time.time() if run.status == "running" else status.get("time", run.started)
    return {
        "job": str(job_dir.relative_to(sweep_dir)),
        "status": run.status,
        "best_val_loss": run.best_val_loss,
        "final_val_loss": val[-1] if val else None,
        "scores": scores,  # the last value of each task metric
        "iters": run.iters,
        "tokens_per_s": statistics.median(speed) if speed else None,
        "wall_s": round(end - run.started, 1),  # from the first start: a requeued job counts its wait
        **{k: start.get(k) for k in SIZE},
        "tokens": spent.get("tokens"),
        "flops": spent.get("flops"),
        "overrides": run.overrides,
        "error": status.get("error") or _NO_ERROR.get(run.status, ""),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; overrides shared by every job are left out: they are not what was swept."""
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    scores = score_columns(rows)
    header = ["job", "overrides", "status", "best val", "final val", *scores, "iters", "tok/s", "wall", "error"]
    table = [header] + [
        [
            r["job"],
            " ".join(o for o in r["overrides"] if o not in common),
            r["status"],
            _fmt(r["best_val_loss"], ".4f"),
            _fmt(r["final_val_loss"], ".4f"),
            *(_fmt(r["scores"].get(k), ".4f") for k in scores),
            str(r["iters"]),
            _fmt(r["tokens_per_s"], ",.0f"),
            f"{r['wall_s']:.0f}s",
            r["error"][:80],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _natural(job: str) -> list[str]:
    """Job folders 2 before 10."""
    return [part.zfill(9) if part.isdigit() else part for part in Path(job).parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt.sweep", description="Summarise a sweep folder: summary.csv and a table."
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. multirun/2026-11-25/10-00-00")
    parser.add_argument("--sort", help="the column to rank jobs by, e.g. bpb or hellaswag/acc_norm (default: best_val_loss)")
    args = parser.parse_args(argv)
    if not any(args.sweep_dir.glob("**/.hydra/overrides.yaml")):
        sys.exit(f"error: no job folders in {args.sweep_dir}")
    print(write_summary(args.sweep_dir, args.sort))


if __name__ == "__main__":
    main()
