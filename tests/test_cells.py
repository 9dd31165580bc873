"""Cells of a fabricated sweep (job folders written here: overrides, status, metrics) through the
command: every number of cells.csv equals a direct scipy.stats computation on the values written,
and every bad input is one line and exit status 2."""

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sp

from omegaconf import OmegaConf

from conftest import ROOT
from nanogpt.sweep import SweepSummary, main

SHARED = ["model=tiny", "max_iters=200"]
TARGET = 3.3
ITERS = [0, 50, 100, 150, 200]


def fabricate_job(job: Path, overrides: list[str], curve: list[float], bpb: float | None = None,
                  status: str = "finished") -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "status.json").write_text(json.dumps({"status": status, "time": time.time()}))
    records = [{"iter": it, "kind": "eval", "train_loss": v, "val_loss": v, "tokens": it * 512, "train_time_s": it * 0.1 + 1}
               for it, v in zip(ITERS, curve)]
    if bpb is not None:
        records.append({"iter": ITERS[-1], "kind": "tasks", "bpb": bpb, "tokens": ITERS[-1] * 512, "train_time_s": 21})
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def curve(final: float) -> list[float]:
    """A val loss curve falling to final (below TARGET), crossing TARGET between iterations 100 and 150."""
    return [4.2, 3.6, 3.4, final - 0.05, final]


# cell (the swept override) -> final val losses of its seeds; bpb = 1.5 x the final loss
CELLS = {
    "optim.learning_rate=0.001": [3.281, 3.274, 3.290],
    "optim.learning_rate=0.002": [3.262, 3.270, 3.251, 3.266],
    "optim.learning_rate=0.004": [3.299, 3.246, 3.259],
}


@pytest.fixture
def sweep(tmp_path) -> Path:
    folder, num = tmp_path / "sweep", 0
    for cell, finals in CELLS.items():
        for seed, final in enumerate(finals):
            fabricate_job(folder / str(num), [*SHARED, cell, f"system.seed={seed}"], curve(final), bpb=1.5 * final)
            num += 1
    fabricate_job(folder / str(num), [*SHARED, "optim.learning_rate=0.004", "system.seed=9"], [4.2, 3.9], status="failed")
    return folder


def cells_csv(folder: Path) -> dict[str, dict]:
    with open(folder / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    return {r["overrides"].split()[-1]: r for r in rows}


def number(row: dict, key: str) -> float | None:
    return float(row[key]) if row[key] else None


def close(x: float | None, y: float) -> bool:
    return x is not None and abs(x - y) < 1e-9


def test_cells_equal_a_direct_scipy_computation(sweep, capsys):
    main([str(sweep), "--baseline", "optim.learning_rate=1e-3", "--target", str(TARGET)])  # 1e-3 is Hydra's 0.001
    rows = cells_csv(sweep)
    base = CELLS["optim.learning_rate=0.001"]
    p_values = {}
    for cell, finals in CELLS.items():
        row, x = rows[cell], np.array(finals)
        n, mean, s = len(x), x.mean(), x.std(ddof=1)
        assert (row["n"], row["failed"]) == (str(n), "1" if cell.endswith("0.004") else "0")
        half = sp.t.ppf(0.975, n - 1) * s / math.sqrt(n)
        # best val loss: the evaluation before the last, 0.05 lower; bpb 1.5 x the final val loss
        for metric, scale, shift in (("final_val_loss", 1.0, 0), ("best_val_loss", 1.0, -0.05), ("bpb", 1.5, 0)):
            assert close(number(row, f"{metric}/mean"), scale * mean + shift)
            assert close(number(row, f"{metric}/std"), scale * s)
            assert close(number(row, f"{metric}/ci_low"), scale * (mean - half) + shift)
            assert close(number(row, f"{metric}/ci_high"), scale * (mean + half) + shift)
        assert close(number(row, "final_val_loss/noise_floor"), sp.t.ppf(0.975, 2 * n - 2) * s * math.sqrt(2 / n))
        t = (mean - TARGET) / (s / math.sqrt(n))
        assert close(number(row, "final_val_loss/p_target"), sp.t.cdf(t, n - 1))
        # time to target: TARGET is crossed between iter 100 (3.4) and 150 (final - 0.05)
        iters = [100 + 50 * (3.4 - TARGET) / (3.4 - (f - 0.05)) for f in finals]
        assert row["reached"] == str(n)
        assert close(number(row, "iters_to_target/mean"), np.mean(iters))
        assert close(number(row, "time_to_target_s/mean"), np.mean(iters) * 0.1 + 1)
        assert close(number(row, "tokens_to_target/mean"), np.mean(iters) * 512)
        if cell in ("optim.learning_rate=0.001",):
            assert row["baseline"] == "True" and row["final_val_loss/p_value"] == ""
            continue
        welch = sp.ttest_ind(x, base, equal_var=False)
        ci = welch.confidence_interval(0.95)
        assert close(number(row, "final_val_loss/diff"), mean - np.mean(base))
        assert close(number(row, "final_val_loss/diff_ci_low"), ci.low)
        assert close(number(row, "final_val_loss/diff_ci_high"), ci.high)
        assert close(number(row, "final_val_loss/p_value"), welch.pvalue)
        pooled = math.sqrt(((n - 1) * s**2 + (len(base) - 1) * np.var(base, ddof=1)) / (n + len(base) - 2))
        assert close(number(row, "final_val_loss/effect_size"), (mean - np.mean(base)) / pooled)
        p_values[cell] = welch.pvalue
    low, high = sorted(p_values, key=p_values.get)  # Holm over 2: the smaller p x 2, the larger x 1, kept monotone
    assert close(number(rows[low], "final_val_loss/p_holm"), min(1, 2 * p_values[low]))
    assert close(number(rows[high], "final_val_loss/p_holm"), max(min(1, 2 * p_values[low]), p_values[high]))
    with open(sweep / "cells.csv") as f:  # best final val loss first
        means = [float(r["final_val_loss/mean"]) for r in csv.DictReader(f)]
    assert means == sorted(means)

    out = capsys.readouterr().out
    assert "noise floor of final val: differences below" in out and "the baseline optim.learning_rate=0.001" in out
    assert "3 (+1 failed)" in out and "± " in out


def test_a_run_that_misses_the_target_leaves_its_cells_time_blank(sweep):
    fabricate_job(sweep / "late", [*SHARED, "optim.learning_rate=0.002", "system.seed=7"], [4.2, 3.9, 3.6, 3.5, 3.4])
    main([str(sweep), "--target", str(TARGET), "--metric", "bpb"])
    row = cells_csv(sweep)["optim.learning_rate=0.002"]
    assert (row["n"], row["reached"], row["iters_to_target/mean"]) == ("5", "4", "")  # not a mean of the lucky ones
    assert row["final_val_loss/mean"] != ""


@pytest.mark.parametrize("args, message", [
    (["--baseline", "optim.learning_rate=0.003"], "--baseline 'optim.learning_rate=0.003' names no cell"),
    (["--baseline", "model=tiny"], "matches 3 cells"),
    (["--baseline", "optim.learning_rate=("], "not overrides"),
    (["--over", "data.seed"], "--over data.seed: no job sets data.seed"),
    (["--metric", "hellaswag/acc"], "--metric hellaswag/acc: no such metric"),
])
def test_bad_input_is_one_line_and_exit_2(sweep, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main([str(sweep), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_target_without_val_loss_and_a_folder_without_jobs_exit_2(tmp_path, capsys):
    for seed in range(2):  # runs that recorded no evaluation
        fabricate_job(tmp_path / "sweep" / str(seed), ["model=tiny", f"system.seed={seed}"], [])
    proc = subprocess.run([sys.executable, "-m", "nanogpt.sweep", "sweep", "--target", "3.28"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 2 and proc.stderr == "error: --target 3.28: no finished run has a val loss (evaluations: eval_interval)\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "empty")])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: no job folders in {tmp_path / 'empty'}: not a sweep folder\n"


def test_train_py_does_not_import_scipy_for_the_summary():
    """Every train.py imports nanogpt.sweep; scipy.stats would add about a second to its start-up."""
    check = "import sys, nanogpt.sweep; assert not [m for m in sys.modules if m.startswith('scipy')]"
    subprocess.run([sys.executable, "-c", check], check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_the_end_of_a_sweep_reports_a_comparison_that_does_not_fit_and_still_writes_the_cells(sweep, capsys):
    callback = SweepSummary(over="system.seed", baseline="optim.learning_rate=0.003", target=TARGET)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    out, err = capsys.readouterr()
    assert err.startswith("error: --baseline 'optim.learning_rate=0.003' names no cell") and err.count("\n") == 1
    assert "the summary is written without it" in err
    rows = cells_csv(sweep)
    assert rows["optim.learning_rate=0.001"]["n"] == "3" and "baseline" not in rows["optim.learning_rate=0.001"]
    assert (sweep / "summary.csv").exists() and "3 cells" in out
