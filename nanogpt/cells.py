"""Cells: the jobs of one or several sweeps that differ only in their seed, and what they say.

A cell is every finished job with the same overrides once the seed keys (system.seed, or the
keys named by --over) are left out. Per cell and per metric (best and final val loss, each eval
task's score, and with a target the iterations, tokens and training seconds to reach it): n, the
mean, the standard deviation and a 95% interval; against a baseline cell, the difference with
Welch's interval, p-value, Holm's adjusted p-value and Cohen's d; against a target, the one-sided
p-value that the mean final val loss is below it. The numbers come from nanogpt.stats; the jobs
from the summary rows nanogpt.sweep builds from their folders. Jobs that failed or have not
finished are left out and counted in their cell's `failed`.
"""

import shlex
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from nanogpt import stats
from nanogpt.errors import UserError

SEED_KEYS = ["system.seed"]
BASE_METRICS = ["best_val_loss", "final_val_loss"]
DEFAULT_METRIC = "final_val_loss"
# per run: where the val loss curve first reaches the target, read on each of these axes
TO_TARGET = {"iters_to_target": "iter", "tokens_to_target": "tokens", "time_to_target_s": "train_time_s"}
ESTIMATE = ["mean", "std", "ci_low", "ci_high", "noise_floor"]
AGAINST_BASELINE = ["diff", "diff_ci_low", "diff_ci_high", "p_value", "p_holm", "effect_size"]


@dataclass
class Cell:
    overrides: list[str]  # as its first job recorded them, the seed keys left out
    runs: list[dict] = field(default_factory=list)  # the summary rows of its finished jobs
    failed: int = 0  # its jobs left out: failed, interrupted, crashed or still running


@dataclass(frozen=True)
class Comparison:
    """What a cell table compares (the command's options; the callback's keys)."""

    over: list[str] | None = None  # the keys a cell's runs differ in (default: SEED_KEYS)
    baseline: str | None = None  # overrides naming the reference cell: "model.qk_norm=false"
    target: float | None = None  # a val loss: time to reach it, and the test that the mean ends below it
    metric: str = DEFAULT_METRIC  # cells are sorted by it; the noise floor is given for it


def compare(rows: list[dict], how: Comparison = Comparison()) -> tuple[list[str], list[dict]]:
    """cells.csv's columns and rows for summary rows (of one sweep or several)."""
    cells = group(rows, how.over)
    baseline = find(cells, how.baseline) if how.baseline is not None else None
    return table(cells, baseline, how.target, how.metric)


def higher_is_better(metric: str) -> bool:
    """Accuracies rank high first; losses, bits per byte and times low first."""
    return "acc" in metric


def group(rows: list[dict], over: list[str] | None = None) -> list[Cell]:
    """The cells of summary rows (any number of sweeps), in the order first met. `over` names the
    keys that vary within a cell (default: system.seed); naming one no job sets is an error."""
    parsed = [[_parse(o) for o in row["overrides"]] for row in rows]
    if over is not None:
        unset = [k for k in over if not any(key == k for job in parsed for key, _ in job)]
        if unset:
            raise UserError(f"--over {','.join(unset)}: no job sets {' or '.join(unset)} "
                            f"(the jobs set {', '.join(sorted({k for job in parsed for k, _ in job}))})")
    over = SEED_KEYS if over is None else over
    cells: dict[frozenset, Cell] = {}
    for row, job in zip(rows, parsed):
        kept = [(o, canonical) for o, (key, canonical) in zip(row["overrides"], job) if key not in over]
        cell = cells.setdefault(frozenset(c for _, c in kept), Cell([o for o, _ in kept]))
        if row["status"] == "finished":
            cell.runs.append(row)
        else:
            cell.failed += 1
    for cell in cells.values():  # the same runs in the same order, however the jobs were split into sweeps
        cell.runs.sort(key=lambda r: (sorted(set(r["overrides"]) - set(cell.overrides)), str(r["folder"])))
    return list(cells.values())


def find(cells: list[Cell], baseline: str) -> Cell:
    """The cell named by overrides ("model.qk_norm=false"): the one that has them all; when
    several do, the one with nothing else that is not shared by every cell. Values compare as
    Hydra parses them (1e-3 is 0.001)."""
    try:
        wanted = {_parse(o, strict=True)[1] for o in shlex.split(baseline)}
    except (UserError, ValueError):
        raise UserError(f"--baseline {baseline!r}: not overrides (key=value, separated by spaces)") from None
    shared = set.intersection(*(_canonical(c) for c in cells)) if cells else set()
    matches = [c for c in cells if wanted <= _canonical(c)]
    if len(matches) > 1:
        matches = [c for c in matches if _canonical(c) - shared <= wanted] or matches
    if len(matches) != 1:
        names = "; ".join(" ".join(o for o in c.overrides if _parse(o)[1] not in shared) or "(no other overrides)"
                          for c in (matches or cells))
        what = "names no cell" if not matches else f"matches {len(matches)} cells"
        raise UserError(f"--baseline {baseline!r} {what}; the cells are: {names}")
    return matches[0]


def table(cells: list[Cell], baseline: Cell | None = None, target: float | None = None,
          metric: str = DEFAULT_METRIC) -> tuple[list[str], list[dict]]:
    """cells.csv: its columns and one row per cell, sorted by `metric`'s mean."""
    if target is not None and not any(r["final_val_loss"] is not None for c in cells for r in c.runs):
        raise UserError(f"--target {target}: no finished run has a val loss (evaluations: eval_interval)")
    samples = [_samples(c, target) for c in cells]
    scores = [m for s in samples for m in s if m not in BASE_METRICS and m not in TO_TARGET]
    metrics = list(dict.fromkeys([*BASE_METRICS, *scores, *(TO_TARGET if target is not None else ())]))
    if metric not in metrics:
        raise UserError(f"--metric {metric}: no such metric in these runs; choose one of {', '.join(metrics)}")
    rows = [_cell_row(cell, s, metrics, target) for cell, s in zip(cells, samples)]
    if baseline is not None:
        _compare(rows, samples, cells.index(baseline), metrics)
    sign = -1 if higher_is_better(metric) else 1
    rows.sort(key=lambda r: (r[f"{metric}/mean"] is None, sign * (r[f"{metric}/mean"] or 0.0), r["overrides"]))
    return _columns(metrics, baseline is not None, target is not None), rows


def to_target(evals: list[dict], target: float) -> dict[str, float | None]:
    """Iterations, tokens and training seconds at which a run's val loss first reaches target,
    interpolated linearly between the two evaluations around the crossing; None: not reached."""
    evals = [e for e in evals if np.isfinite(e["val_loss"])]
    at = stats.crossing([e["val_loss"] for e in evals], target)
    return {name: None if at is None else float(np.interp(at, range(len(evals)), [e[x] for e in evals]))
            for name, x in TO_TARGET.items()}


def _samples(cell: Cell, target: float | None) -> dict[str, list[float]]:
    """metric -> its values over the cell's runs (a run without the metric left out). The times
    to a target are kept only when every run reached it: a mean over the runs that happened to
    get there would flatter the cell."""
    per_run = []
    for r in cell.runs:
        values = {"best_val_loss": r["best_val_loss"], "final_val_loss": r["final_val_loss"], **r["scores"]}
        per_run.append(values | (to_target(r["evals"], target) if target is not None else {}))
    samples = {k: [v[k] for v in per_run if v.get(k) is not None] for k in dict.fromkeys(k for v in per_run for k in v)}
    for name in TO_TARGET if target is not None else ():
        if len(samples.get(name, [])) < len(per_run):
            samples[name] = []
    return samples


def _cell_row(cell: Cell, samples: dict[str, list[float]], metrics: list[str], target: float | None) -> dict:
    row = {"overrides": " ".join(cell.overrides), "n": len(cell.runs), "failed": cell.failed}
    if target is not None:
        row["reached"] = sum(to_target(r["evals"], target)["iters_to_target"] is not None for r in cell.runs)
        row["final_val_loss/p_target"] = stats.below_target(samples.get("final_val_loss", []), target)
    for m in metrics:
        e = stats.estimate(samples.get(m, []))
        row |= {f"{m}/mean": e.mean, f"{m}/std": e.std, f"{m}/ci_low": e.ci_low, f"{m}/ci_high": e.ci_high,
                f"{m}/noise_floor": stats.noise_floor(e.n, e.std)}
    return row


def _compare(rows: list[dict], samples: list[dict], base: int, metrics: list[str]) -> None:
    """Each cell's difference to the baseline's, per metric, and Holm's adjustment over the cells.
    A cell (or baseline) of one run gets its difference only: there is no variance to test."""
    for i, row in enumerate(rows):
        row["baseline"] = i == base
    others = [i for i in range(len(rows)) if i != base]
    for m in metrics:
        a = samples[base].get(m, [])
        diffs = {i: stats.welch(a, samples[i].get(m, [])) for i in others}
        holm = dict(zip(others, stats.holm([d and d.p_value for d in diffs.values()])))
        for i, d in diffs.items():
            b = samples[i].get(m, [])
            if d is None and a and b:
                d = stats.Difference(float(np.mean(b) - np.mean(a)), None, None, None, None)
            if d is not None:
                rows[i] |= {f"{m}/diff": d.diff, f"{m}/diff_ci_low": d.ci_low, f"{m}/diff_ci_high": d.ci_high,
                            f"{m}/p_value": d.p_value, f"{m}/p_holm": holm[i], f"{m}/effect_size": d.effect_size}


def _columns(metrics: list[str], baseline: bool, target: bool) -> list[str]:
    columns = ["overrides", "n", "failed"] + ["baseline"] * baseline + ["reached"] * target
    for m in metrics:
        columns += [f"{m}/{s}" for s in ESTIMATE + AGAINST_BASELINE * baseline]
        if target and m == "final_val_loss":
            columns.append(f"{m}/p_target")
    return columns


@cache
def _parse(override: str, strict: bool = False) -> tuple[str, str]:
    """(key, canonical form): 'optim.learning_rate=1e-3' -> ('optim.learning_rate', 'optim.learning_rate=0.001').
    What Hydra cannot parse is an error from the user (strict), else taken as written."""
    try:
        [o] = OverridesParser.create().parse_overrides([override])
    except HydraException:
        if strict:
            raise UserError(f"{override!r} is not a Hydra override") from None
        return override.split("=", 1)[0].lstrip("+~"), override
    value = o.get_value_element_as_str() if o.value() is not None else ""
    return o.key_or_group, f"{o.get_key_element()}={value}"


def _canonical(cell: Cell) -> set[str]:
    return {canonical for _, canonical in map(_parse, cell.overrides)}
