"""Scaling laws from sweeps of budgeted runs (docs/scaling.md): the compute-optimal model size and
data for each FLOP budget, and how they grow with the budget.

    python -m nanogpt.scaling multirun/2026-12-05/10-00-00 [more sweep folders] [--metric bpb]

The input is each sweep's summary.csv (nanogpt/sweep.py): per job its status, final val loss (and
task metrics such as bpb), N (params_non_embedding), D (tokens trained), C (flops trained) and the
budget it ran under (flops_budget or tokens_per_param). The output goes to the (first) sweep
folder: scaling.json with every number below and the points used and left out, scaling.png, and
a printed table. Written at the end of every sweep that has budgeted runs, and by this command.

- isoFLOP (runs with flops_budget; Chinchilla's approach 2): per budget C, a parabola of the loss
  against ln N gives N_opt (its vertex) and L_opt; the same against ln D gives D_opt, shown beside
  Chinchilla's C / (6 N_opt). A budget with fewer than 3 finished runs, whose best run is its
  smallest or largest model (the minimum may lie beyond), or whose parabola opens downwards is
  reported as not fitted, with the reason.
- Across the fitted budgets: N_opt = k C^a and D_opt = k C^b, straight lines in log-log (numpy's
  polyfit; the exponent's standard error from its covariance with 3 or more budgets), and the
  tokens per parameter D_opt / N_opt at each optimum.
- Miniseries (runs with tokens_per_param and no flops_budget): L(C) = E + A C^-alpha over the final
  losses and FLOPs of each tokens_per_param (scipy's curve_fit; standard errors with 4 or more runs).
"""

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import curve_fit

from nanogpt.errors import UserError

SUMMARY, REPORT, FIGURE = "summary.csv", "scaling.json", "scaling.png"


@dataclass
class Point:
    """One finished run: its loss (the chosen metric) at N parameters, D tokens, C FLOPs."""

    job: str
    loss: float
    n: int  # params_non_embedding
    d: int  # tokens trained
    c: float  # FLOPs trained


# -- reading the sweeps ----------------------------------------------------------------------------

def read_summaries(sweep_dirs: list[Path]) -> list[dict]:
    """The rows of each sweep's summary.csv; with several sweeps, each job named by its sweep too."""
    rows = []
    for sweep in sweep_dirs:
        path = Path(sweep) / SUMMARY
        if not path.is_file():
            raise UserError(f"{path} does not exist: python -m nanogpt.sweep {sweep} writes it")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(row | {"job": row["job"] if len(sweep_dirs) == 1 else f"{sweep}/{row['job']}"})
    return rows


def choose_metric(rows: list[dict], metric: str | None) -> str:
    """The metric asked for, else bpb where the runs have it (comparable across tokenizers), else
    the final val loss."""
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    if metric is None:
        return "bpb" if any(r.get("bpb") for r in rows) else "final_val_loss"
    if metric not in columns:
        wanted = sorted(c for c in columns if c in ("final_val_loss", "best_val_loss") or "/" in c or c == "bpb")
        raise UserError(f"--metric {metric}: the summaries have no such column (they have {', '.join(wanted)})")
    return metric


def budget_of(row: dict, key: str) -> float | None:
    """The job's flops_budget or tokens_per_param: from its start record (summary column), else
    from its overrides (a job that failed before starting has only those)."""
    value = _number(row.get(key))
    if value is None:
        given = [o.split("=", 1)[1] for o in row.get("overrides", "").split() if o.lstrip("+~").startswith(f"{key}=")]
        value = _number(given[-1]) if given else None
    return value


def sort_runs(rows: list[dict], metric: str) -> tuple[dict[float, list[Point]], dict[float, list[Point]], list[dict]]:
    """(isoFLOP points by flops_budget, miniseries points by tokens_per_param, jobs left out with why)."""
    isoflop, series, left_out = {}, {}, []
    for row in rows:
        budget, ratio = budget_of(row, "flops_budget"), budget_of(row, "tokens_per_param")
        reason = None
        if budget is None and ratio is None:
            reason = "no flops_budget or tokens_per_param: not part of a scaling sweep"
        elif row.get("status") != "finished":
            reason = f"{row.get('status')}: {row.get('error') or 'no error recorded'}"
        elif _number(row.get(metric)) is None:
            reason = f"no {metric} recorded"
        elif None in (_number(row.get(k)) for k in ("params_non_embedding", "tokens", "flops")):
            reason = "no size, tokens or FLOPs recorded (a run from before the start record)"
        if reason:
            left_out.append({"job": row["job"], "overrides": row.get("overrides", ""), "reason": reason})
            continue
        point = Point(row["job"], _number(row[metric]), int(_number(row["params_non_embedding"])),
                      int(_number(row["tokens"])), _number(row["flops"]))
        (isoflop.setdefault(budget, []) if budget is not None else series.setdefault(ratio, [])).append(point)
    return isoflop, series, left_out


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# -- the fits --------------------------------------------------------------------------------------

def isoflop_fit(budget: float, points: list[Point]) -> dict:
    """One budget's parabolas of loss against ln N and ln D, and their minima when they count."""
    points = sorted(points, key=lambda p: p.n)
    result = {"flops_budget": budget, "points": [asdict(p) for p in points]}
    if len(points) < 3:
        return result | {"fitted": False, "reason": f"{len(points)} finished run(s): a parabola needs 3"}
    ln_n, ln_d = np.log([p.n for p in points]), np.log([p.d for p in points])
    loss = np.array([p.loss for p in points])
    by_n, by_d = np.polyfit(ln_n, loss, 2), np.polyfit(ln_d, loss, 2)
    result |= {"parabola_ln_n": by_n.tolist(), "parabola_ln_d": by_d.tolist()}
    best = points[int(np.argmin(loss))]
    if best.n in (points[0].n, points[-1].n):
        side, add = ("smallest", "smaller") if best.n == points[0].n else ("largest", "larger")
        return result | {"fitted": False, "reason": f"the best run ({best.job}, N={best.n:,}) is the {side} model: "
                                                    f"the minimum may lie beyond; add a {add} depth"}
    if by_n[0] <= 0 or by_d[0] <= 0:
        return result | {"fitted": False, "reason": "the parabola opens downwards: the losses form no valley"}
    n_opt, d_opt = math.exp(-by_n[1] / (2 * by_n[0])), math.exp(-by_d[1] / (2 * by_d[0]))
    return result | {
        "fitted": True,
        "n_opt": n_opt,
        "loss_opt": float(np.polyval(by_n, math.log(n_opt))),
        "d_opt": d_opt,
        "d_opt_chinchilla": budget / (6 * n_opt),  # C = 6 N D
        "tokens_per_param": d_opt / n_opt,
    }


def power_law(c: list[float], y: list[float]) -> dict:
    """y = k C^exponent: a line through (ln C, ln y); the exponent's standard error with 3 or more."""
    if len(c) < 2:
        return {"fitted": False, "reason": f"{len(c)} fitted budget(s): a power law needs 2"}
    x, ln_y = np.log(c), np.log(y)
    error = None
    if len(c) >= 3:
        (slope, intercept), cov = np.polyfit(x, ln_y, 1, cov=True)
        error = math.sqrt(cov[0, 0])
    else:
        slope, intercept = np.polyfit(x, ln_y, 1)
    return {"fitted": True, "exponent": float(slope), "exponent_error": error, "coefficient": math.exp(intercept)}


def compute_law(points: list[Point]) -> dict:
    """L(C) = E + A C^-alpha over a miniseries' runs (scipy's curve_fit, C in units of the
    smallest run's FLOPs so that the three parameters are of like size)."""
    points = sorted(points, key=lambda p: p.c)
    result = {"points": [asdict(p) for p in points]}
    if len(points) < 3:
        return result | {"fitted": False, "reason": f"{len(points)} finished run(s): L(C) needs 3"}
    c, loss = np.array([p.c for p in points]), np.array([p.loss for p in points])
    unit = c[0]
    law = lambda x, e, a, alpha: e + a * x ** -alpha  # noqa: E731
    try:
        (e, a, alpha), cov = curve_fit(law, c / unit, loss, p0=(0.9 * loss.min(), loss.max() - 0.9 * loss.min(), 0.3),
                                       bounds=([0, 0, 0], [np.inf, np.inf, 5]), maxfev=20_000)
    except (RuntimeError, ValueError) as e:
        return result | {"fitted": False, "reason": f"curve_fit failed: {e}"}
    errors = np.sqrt(np.diag(cov)) if len(points) > 3 and np.all(np.isfinite(cov)) else [None] * 3
    scale = unit ** alpha  # A (C/unit)^-alpha = (A unit^alpha) C^-alpha
    return result | {
        "fitted": True, "E": float(e), "A": float(a * scale), "alpha": float(alpha),
        "E_error": _float(errors[0]), "A_error": _float(errors[1] * scale if errors[1] is not None else None),
        "alpha_error": _float(errors[2]),
    }


def _float(x) -> float | None:
    return None if x is None else float(x)


def analyse(rows: list[dict], metric: str) -> dict:
    """Every fit of the scaling report, from the summaries' rows."""
    isoflop, series, left_out = sort_runs(rows, metric)
    budgets = [isoflop_fit(c, isoflop[c]) for c in sorted(isoflop)]
    fitted = [b for b in budgets if b["fitted"]]
    c = [b["flops_budget"] for b in fitted]
    return {
        "metric": metric,
        "isoflop": budgets,
        "n_opt_law": power_law(c, [b["n_opt"] for b in fitted]) if budgets else None,
        "d_opt_law": power_law(c, [b["d_opt"] for b in fitted]) if budgets else None,
        "miniseries": [{"tokens_per_param": r} | compute_law(series[r]) for r in sorted(series)],
        "left_out": left_out,
    }


# -- the report ------------------------------------------------------------------------------------

def write_report(sweep_dirs: list[Path], metric: str | None = None) -> str | None:
    """Fit, write scaling.json and scaling.png into the first sweep folder; return the table to
    print, or None when no job of the sweeps ran with a budget."""
    rows = read_summaries(sweep_dirs)
    if not any(budget_of(r, "flops_budget") or budget_of(r, "tokens_per_param") for r in rows):
        return None
    metric = choose_metric(rows, metric)
    report = {"sweeps": [str(d) for d in sweep_dirs]} | analyse(rows, metric)
    out = Path(sweep_dirs[0])
    (out / REPORT).write_text(json.dumps(report, indent=1))
    figure(report).savefig(out / FIGURE, dpi=100)
    return f"scaling laws of {', '.join(map(str, sweep_dirs))}: {REPORT}, {FIGURE}\n{format_report(report)}"


def after_sweep(sweep_dir: Path) -> str | None:
    """At a sweep's end (nanogpt/sweep.py): the report of a sweep with budgeted runs. Whatever goes
    wrong in it is said in one line, never raised: the sweep has its summary either way."""
    try:
        return write_report([Path(sweep_dir)])
    except Exception as e:  # a failed fit never fails the sweep
        return f"scaling laws of {sweep_dir}: not written ({type(e).__name__}: {e})"


def format_report(report: dict) -> str:
    lines = []
    if report["isoflop"]:
        lines.append(f"isoFLOP fits of {report['metric']} (N: parameters without embeddings, D: tokens)")
        lines += _table([["budget C", "runs", "N_opt", "D_opt", "C/(6 N_opt)", "D/N", "L_opt"]] + [
            [f"{b['flops_budget']:.3g}", str(len(b["points"])), *(
                [_si(b["n_opt"]), _si(b["d_opt"]), _si(b["d_opt_chinchilla"]), f"{b['tokens_per_param']:.1f}",
                 f"{b['loss_opt']:.4f}"] if b["fitted"] else [f"not fitted: {b['reason']}"])]
            for b in report["isoflop"]
        ])
        lines += [f"{name} ~ C^{_law(law)}" for name, law in (("N_opt", report["n_opt_law"]), ("D_opt", report["d_opt_law"]))]
    for s in report["miniseries"]:
        fit = (f"L(C) = {s['E']:.4f} + {s['A']:.4g} C^-{s['alpha']:.4f}" if s["fitted"] else f"not fitted: {s['reason']}")
        lines.append(f"miniseries tokens_per_param={s['tokens_per_param']:g}, {len(s['points'])} runs: {fit}")
    lines += [f"left out {j['job']}: {j['reason']}" for j in report["left_out"]]
    return "\n".join(lines)


def _law(law: dict) -> str:
    if not law["fitted"]:
        return f"a: not fitted, {law['reason']}"
    error = " (2 budgets: no error)" if law["exponent_error"] is None else f" ± {law['exponent_error']:.3f}"
    return f"{law['exponent']:.3f}{error}"


def _table(rows: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell in full rows; a shorter row's last cell runs on."""
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _si(x: float) -> str:
    return f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}K" if x >= 1e3 else f"{x:.3g}"


def figure(report: dict) -> Figure:
    """isoFLOP curves with their minima, N_opt and D_opt against C (log axes); a miniseries' L(C)."""
    panels = (3 if report["isoflop"] else 0) + (1 if report["miniseries"] else 0)
    fig = Figure(figsize=(4.6 * max(panels, 1), 4), layout="constrained")
    axes = list(fig.subplots(1, max(panels, 1), squeeze=False)[0])
    if report["isoflop"]:
        _isoflop_panels(axes[:3], report)
    if report["miniseries"]:
        _miniseries_panel(axes[-1], report)
    fig.suptitle(f"scaling laws of {report['metric']}: {', '.join(report['sweeps'])}", fontsize="small")
    return fig


def _isoflop_panels(axes, report: dict) -> None:
    curves, n_ax, d_ax = axes
    for i, b in enumerate(report["isoflop"]):
        colour = f"C{i % 10}"  # matplotlib's default colour cycle
        n, loss = [p["n"] for p in b["points"]], [p["loss"] for p in b["points"]]
        curves.plot(n, loss, "o", color=colour, label=f"C={b['flops_budget']:.2g}" + ("" if b["fitted"] else " (not fitted)"),
                    fillstyle="full" if b["fitted"] else "none")
        if "parabola_ln_n" in b:
            x = np.linspace(math.log(min(n)), math.log(max(n)), 100)
            curves.plot(np.exp(x), np.polyval(b["parabola_ln_n"], x), "-" if b["fitted"] else ":", color=colour)
        if b["fitted"]:
            curves.plot(b["n_opt"], b["loss_opt"], "*", color=colour, markersize=14, markeredgecolor="k")
    curves.set(xscale="log", xlabel="N (parameters without embeddings)", ylabel=report["metric"], title="isoFLOP curves")
    curves.tick_params(which="minor", labelsize="x-small")  # labelled when the range spans less than a decade
    curves.legend(fontsize="small")
    fitted = [b for b in report["isoflop"] if b["fitted"]]
    for ax, key, law, name in ((n_ax, "n_opt", report["n_opt_law"], "N_opt"), (d_ax, "d_opt", report["d_opt_law"], "D_opt")):
        ax.set(xlabel="C (FLOPs)", ylabel=name, title=f"{name} against compute")
        if not fitted:
            ax.text(0.5, 0.5, "no budget fitted", ha="center", va="center", transform=ax.transAxes)
            continue
        c = np.array([b["flops_budget"] for b in fitted])
        ax.plot(c, [b[key] for b in fitted], "o", label=name)
        if key == "d_opt":
            ax.plot(c, [b["d_opt_chinchilla"] for b in fitted], "x", label="C / (6 N_opt)")
        if law and law["fitted"]:
            x = np.geomspace(c.min(), c.max(), 50)
            ax.plot(x, law["coefficient"] * x ** law["exponent"], "-", label=f"{name} ∝ C^{law['exponent']:.2f}")
        ax.set(xscale="log", yscale="log")
        ax.tick_params(which="minor", labelsize="x-small")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")


def _miniseries_panel(ax, report: dict) -> None:
    for s in report["miniseries"]:
        c, loss = [p["c"] for p in s["points"]], [p["loss"] for p in s["points"]]
        line = ax.plot(c, loss, "o", label=f"tokens_per_param={s['tokens_per_param']:g}")[0]
        if s["fitted"]:
            x = np.geomspace(min(c), max(c), 100)
            ax.plot(x, s["E"] + s["A"] * x ** -s["alpha"], "-", color=line.get_color(),
                    label=f"{s['E']:.3f} + {s['A']:.3g} C^-{s['alpha']:.3f}")
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel=report["metric"], title="loss against compute")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (multirun) folders, each with its summary.csv")
    parser.add_argument("--metric", help="the summary column to fit, e.g. bpb or best_val_loss "
                                         "(default: bpb where the runs have it, else final_val_loss)")
    args = parser.parse_args(argv)
    try:
        text = write_report(args.sweep_dirs, args.metric)
        if text is None:
            raise UserError(f"no job in {', '.join(map(str, args.sweep_dirs))} ran with flops_budget or tokens_per_param")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
