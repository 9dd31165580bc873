"""Sweep summaries: one row per job of a multirun, and one per cell of jobs that differ only in
their seed, built from the jobs' own files.

Each job folder holds .hydra/overrides.yaml (what the job ran with), status.json (finished, failed
with its error, interrupted, preempted) and metrics.jsonl (losses, speed, the eval group's scores).
The summary is summary.csv in the sweep folder plus a printed table, best val loss first (or by
any column: --sort hellaswag/acc_norm), with a column for each task metric's last value, each
mixture source's final val loss (val_loss/<name>), the model's size and budget (from its start
record) and the tokens and FLOPs it trained on. Beside it
cells.csv: per cell (nanogpt.cells) n, means and 95% intervals, and against a baseline or a
target the differences, p-values and times to the target. Both are written

- by SweepSummary.on_multirun_end, when every job returned;
- by write_pending() in train.py's `finally`: Hydra skips on_multirun_end when a job failed
  (the sweeper re-raises the first failure, the submitit launcher raises for a job that died);
- on demand, for any sweep folders, finished or still running (cells over all of them, written
  into the first's cells.csv):
      python -m nanogpt.sweep multirun/2026-11-25/10-00-00 [--sort bpb]
      python -m nanogpt.sweep multirun/2026-11-25/10-00-00 --baseline "model.qk_norm=false" --target 3.28

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

from nanogpt.cells import DEFAULT_METRIC, TO_TARGET, Comparison, compare, higher_is_better
from nanogpt.errors import UserError
from nanogpt.rundir import read_metrics, read_status, source_losses, task_scores, write_status
from nanogpt.runs import describe

SUMMARY, CELLS = "summary.csv", "cells.csv"
SIZE = ["params", "params_non_embedding", "flops_per_token", "tokens_per_param", "flops_budget"]  # its start record's
COLUMNS = ["job", "status", "best_val_loss", "final_val_loss", "iters", "tokens_per_s", "wall_s", *SIZE, "tokens", "flops",
           "overrides", "error"]

_NO_ERROR = {  # what a status without an error message means
    "unknown": "no status.json: the job stopped before training (see its log)",
    "crashed": "its process is gone without a status (killed? out of memory?)",
}
_pending: dict[Path, Comparison] = {}  # sweeps started in this process and not summarised yet


class SweepSummary(Callback):
    """Hydra callback, registered under hydra.callbacks in conf/config.yaml; its keys are the
    command's options: hydra.callbacks.sweep_summary.baseline='model.qk_norm=true'."""

    def __init__(self, over: str | list[str] | None = None, baseline: str | None = None,
                 target: float | None = None, metric: str = DEFAULT_METRIC) -> None:
        over = over.split(",") if isinstance(over, str) else over
        self.comparison = Comparison(None if over is None else list(over), baseline, target, metric)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)  # a sweeper may store files before any job: Optuna's study
        _pending[sweep_dir] = self.comparison

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
    """Summarise the sweeps this process started and has not summarised yet. A comparison that
    does not fit the runs (a baseline naming no cell) is reported in a line, and the summary
    written with less: without baseline, target and metric, then with the default cells. A sweep
    of budgeted runs also gets its scaling laws (nanogpt.scaling)."""
    from nanogpt.scaling import after_sweep  # matplotlib's figures: loaded only at a sweep's end

    while _pending:
        sweep_dir, comparison = _pending.popitem()
        for how in (comparison, Comparison(over=comparison.over), Comparison()):
            try:
                print(write_summary([sweep_dir], comparison=how))
                break
            except UserError as e:
                print(f"error: {e}; the summary is written without it", file=sys.stderr)
        report = after_sweep(sweep_dir)  # scaling.json and scaling.png, when the jobs ran with a budget
        if report:
            print(report)


def write_summary(sweep_dirs: list[Path], sort: str | None = None, comparison: Comparison = Comparison()) -> str:
    """Write each sweep folder's summary.csv and, over all their jobs, the first's cells.csv;
    return the tables to print."""
    rows = {Path(d): summarize(Path(d), sort) for d in sweep_dirs}
    jobs = {r["folder"].resolve(): r for folder_rows in rows.values() for r in folder_rows}  # a job named twice counts once
    columns, cells = compare(list(jobs.values()), comparison)  # errors before any write
    text = [write_jobs(d, folder_rows) for d, folder_rows in rows.items()]
    first = Path(sweep_dirs[0])
    with open(first / CELLS, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(cells)
    if any(c["n"] + c["failed"] > 1 for c in cells) or comparison.baseline or comparison.target is not None:
        text.append(f"{len(cells)} cells, in {first / CELLS}\n{format_cells(cells, comparison)}")
    return "\n\n".join(text)


def write_jobs(sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """Write <sweep_dir>/summary.csv; return the table to print."""
    scores = score_columns(rows)
    with open(sweep_dir / SUMMARY, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS[:4] + scores + COLUMNS[4:], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **row["scores"], "overrides": " ".join(row["overrides"])})
    return f"sweep {sweep_dir}: {len(rows)} jobs, summary in {SUMMARY}\n{format_table(rows)}"


def summarize(sweep_dir: Path, sort: str | None = None) -> list[dict[str, Any]]:
    """One row per job folder (any folder where Hydra saved a job's overrides), best first by
    `sort` (default: best val loss; accuracies high first, losses and bpb low first)."""
    rows = [job_row(p.parent.parent, sweep_dir) for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    key = sort or "best_val_loss"
    sign = -1 if higher_is_better(key) else 1

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
    evals = [m for m in metrics if m.get("kind") == "eval"]
    tasks = [m for m in metrics if m.get("kind") == "tasks"]
    # the final val loss of each source of a mixture, then the last value of each task metric
    scores = (source_losses(evals[-1]) if evals else {}) | (task_scores(tasks[-1]) if tasks else {})
    speed = [m["tokens_per_s"] for m in metrics if m.get("kind") == "train"]
    start = next((m for m in reversed(metrics) if m.get("kind") == "start"), {})
    spent = next((m for m in reversed(metrics) if "flops" in m), {})  # the last record: tokens and FLOPs trained
    end = time.time() if run.status == "running" else status.get("time", run.started)
    return {
        "job": str(job_dir.relative_to(sweep_dir)),
        "status": run.status,
        "best_val_loss": run.best_val_loss,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "scores": scores,
        "iters": run.iters,
        "tokens_per_s": statistics.median(speed) if speed else None,
        "wall_s": round(end - run.started, 1),  # from the first start: a requeued job counts its wait
        **{k: start.get(k) for k in SIZE},
        "tokens": spent.get("tokens"),
        "flops": spent.get("flops"),
        "overrides": run.overrides,
        "error": status.get("error") or _NO_ERROR.get(run.status, ""),
        "folder": job_dir,  # not columns: for the cells (nanogpt.cells)
        "evals": evals,
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
    return _align(table)


def format_cells(cells: list[dict[str, Any]], comparison: Comparison) -> str:
    """The cells as a plain-text table: each metric's mean +- the half-width of its 95% interval
    (Student's t: symmetric), against the baseline the chosen metric's difference, p-values and
    effect size; then the noise floor."""
    common = set.intersection(*(set(c["overrides"].split()) for c in cells)) if len(cells) > 1 else set()
    metrics = [k.removesuffix("/mean") for k in cells[0] if k.endswith("/mean")] if cells else []
    shown = [m for m in metrics if m not in TO_TARGET]
    m = comparison.metric
    header = ["cell", "n", *(_label(k) for k in shown)]
    if comparison.target is not None:
        header += ["reached", "iters to target", "time to target", "p(final < target)"]
    if comparison.baseline:
        header += [f"diff ({_label(m)})", "p", "p (Holm)", "d"]
    table = [header]
    for c in cells:
        line = [_cell_label(c, common),
                f"{c['n']}" + (f" (+{c['failed']} failed)" if c["failed"] else ""),
                *(_pm(c, k) for k in shown)]
        if comparison.target is not None:
            line += [f"{c['reached']}/{c['n']}", _pm(c, "iters_to_target", ".0f"), _pm(c, "time_to_target_s", ".1f"),
                     _fmt_p(c["final_val_loss/p_target"])]
        if comparison.baseline:
            line += ["baseline", "", "", ""] if c["baseline"] else [_pm(c, m, "+.4f", "diff"), _fmt_p(c.get(f"{m}/p_value")),
                                                         _fmt_p(c.get(f"{m}/p_holm")), _fmt(c.get(f"{m}/effect_size"), "+.2f")]
        table.append(line)
    return _align(table) + "".join(f"\n{note}" for note in noise_floor(cells, comparison.metric, common))


def noise_floor(cells: list[dict[str, Any]], metric: str, common: set[str]) -> list[str]:
    """One line for the baseline cell, or one per cell when none is named: the difference in
    `metric` below which Welch's test at p < 0.05 cannot tell two cells of its n and s apart."""
    named = [c for c in cells if c.get("baseline")] or cells
    return [f"noise floor of {_label(metric)}: differences below {c[f'{metric}/noise_floor']:.4f} are noise at "
            f"n={c['n']} (s={c[f'{metric}/std']:.4f}, {'the baseline ' * bool(c.get('baseline'))}{_cell_label(c, common)})"
            for c in named if c.get(f"{metric}/noise_floor") is not None]


def _cell_label(cell: dict[str, Any], common: set[str]) -> str:
    """The cell's overrides that not every cell shares."""
    return " ".join(o for o in cell["overrides"].split() if o not in common) or "(no other overrides)"


def _pm(cell: dict, metric: str, spec: str = ".4f", value: str = "mean") -> str:
    """'1.8123 ± 0.0140', or the value alone when there is no interval (one run)."""
    center, high = cell.get(f"{metric}/{value}"), cell.get(f"{metric}/{'diff_ci_high' if value == 'diff' else 'ci_high'}")
    return _fmt(center, spec) + ("" if high is None else f" ± {high - center:{spec.lstrip('+')}}")


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _label(metric: str) -> str:
    return metric.replace("_val_loss", " val").replace("_", " ")


def _align(table: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _natural(job: str) -> list[str]:
    """Job folders 2 before 10."""
    return [part.zfill(9) if part.isdigit() else part for part in Path(job).parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.sweep", description=(
        "Summarise sweep folders: each one's summary.csv, and the first's cells.csv over all of them."))
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun folders, e.g. multirun/2026-11-25/10-00-00")
    parser.add_argument("--sort", help="the column to rank jobs by, e.g. bpb or hellaswag/acc_norm (default: best_val_loss)")
    parser.add_argument("--over", help="the keys a cell's jobs differ in, comma-separated (default: system.seed)")
    parser.add_argument("--baseline", help='overrides naming the cell to compare the others with: "model.qk_norm=false"')
    parser.add_argument("--target", type=float, help="a val loss: per run when it was reached, per cell whether "
                        "the mean final val loss is below it (one-sided t-test)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="the metric cells are sorted and compared by, e.g. "
                        f"best_val_loss, bpb (default: {DEFAULT_METRIC})")
    args = parser.parse_args(argv)
    comparison = Comparison(args.over.split(",") if args.over else None, args.baseline, args.target, args.metric)
    try:
        for folder in args.sweep_dirs:
            if not any(folder.glob("**/.hydra/overrides.yaml")):
                raise UserError(f"no job folders in {folder}: not a sweep folder")
        print(write_summary(args.sweep_dirs, args.sort, comparison))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
