"""Scaling laws (nanogpt/scaling.py): the fits recover planted truth, and a real tiny sweep of
budgets x depths writes scaling.json whose numbers an independent numpy.polyfit of its own
summary.csv reproduces."""

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import linregress

from conftest import run_script
from nanogpt.scaling import after_sweep, analyse, main

# Chinchilla's parametric fit (Hoffmann et al. 2022, approach 3): L(N, D) = E + A/N^alpha + B/D^beta
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))


def n_opt(c: float) -> float:
    """The analytic optimum of L under C = 6 N D."""
    return G * (c / 6) ** (BETA / (ALPHA + BETA))


def planted_row(job: str, c: float, n: float, **extra) -> dict:
    """A summary.csv row (strings, as read back) of a run of N parameters under budget C."""
    d = c / (6 * n)
    loss = E + A / n**ALPHA + B / d**BETA
    return {"job": job, "status": "finished", "final_val_loss": str(loss), "params_non_embedding": str(round(n)),
            "tokens": str(round(d)), "flops": str(c), "flops_budget": str(c), "overrides": f"flops_budget={c:g}",
            "error": ""} | extra


def test_isoflop_fits_recover_the_analytic_optimum():
    """Four budgets, each with 7 sizes spread over a factor 3 either side of a guess that misses
    the optimum by a different factor per budget (as a grid of depths does): N_opt, a and b within
    5% of the analytic ones, and D_opt, C/(6 N_opt) and the tokens per parameter consistent."""
    budgets, misses = [1e18, 1e19, 1e20, 1e21], [1.5, 0.7, 1.3, 0.8]
    rows = [planted_row(f"{c:g}/{i}", c, n) for c, miss in zip(budgets, misses)
            for i, n in enumerate(miss * n_opt(c) * np.geomspace(1 / 3, 3, 7))]
    report = analyse(rows, "final_val_loss")
    assert [b["fitted"] for b in report["isoflop"]] == [True] * 4
    for b in report["isoflop"]:
        assert b["n_opt"] == pytest.approx(n_opt(b["flops_budget"]), rel=0.05)
        assert b["d_opt"] == pytest.approx(b["d_opt_chinchilla"], rel=0.05)  # here D = C / 6N exactly
        assert b["tokens_per_param"] == pytest.approx(b["d_opt"] / b["n_opt"])
    assert report["n_opt_law"]["exponent"] == pytest.approx(BETA / (ALPHA + BETA), rel=0.05)
    assert report["d_opt_law"]["exponent"] == pytest.approx(ALPHA / (ALPHA + BETA), rel=0.05)
    assert report["n_opt_law"]["exponent_error"] < 0.05 and report["left_out"] == []
    # the power laws, again by scipy's linregress: slope, its standard error and the coefficient
    c = np.log([b["flops_budget"] for b in report["isoflop"]])
    for law, key in (("n_opt_law", "n_opt"), ("d_opt_law", "d_opt")):
        line = linregress(c, np.log([b[key] for b in report["isoflop"]]))
        fit = report[law]
        assert (fit["exponent"], fit["exponent_error"], fit["coefficient"]) == pytest.approx(
            (line.slope, line.stderr, math.exp(line.intercept)), rel=1e-6)


def test_budgets_that_cannot_be_fitted_say_why_and_failed_jobs_are_named():
    c = 1e19
    grid = n_opt(c) * np.geomspace(1 / 3, 3, 5)
    rows = [planted_row(f"mid/{i}", c, n) for i, n in enumerate(grid)]
    rows += [planted_row(f"small/{i}", 1e20, n) for i, n in enumerate(grid)]  # its optimum lies above the grid
    rows += [planted_row(f"two/{i}", 1e21, n) for i, n in enumerate(grid[:2])]
    rows += [planted_row("two/crashed", 1e21, grid[2], status="failed", error="UserError: out of budget")]
    rows += [{"job": "plain", "status": "finished", "final_val_loss": "2.0", "overrides": "model=tiny"}]
    report = analyse(rows, "final_val_loss")
    mid, small, two = report["isoflop"]
    assert mid["fitted"] and not small["fitted"] and not two["fitted"]
    assert "small/4" in small["reason"] and "is the largest model" in small["reason"]
    assert "n_opt" not in small and two["reason"] == "2 finished run(s): a parabola needs 3"
    assert {j["job"]: j["reason"] for j in report["left_out"]} == {
        "two/crashed": "failed: UserError: out of budget",
        "plain": "no flops_budget or tokens_per_param: not part of a scaling sweep",
    }
    assert report["n_opt_law"] == {"fitted": False, "reason": "1 fitted budget(s): a power law needs 2"}


def test_a_miniseries_recovers_its_loss_against_compute():
    """L(C) = E + A C^-alpha, planted over 6 runs from 1e12 to 1e17 FLOPs, by scipy's curve_fit."""
    e, a, alpha = 1.8, 60.0, 0.12
    c = np.geomspace(1e12, 1e17, 6)
    rows = [{"job": str(i), "status": "finished", "final_val_loss": str(e + a * x**-alpha), "params_non_embedding": "1",
             "tokens": "1", "flops": str(x), "tokens_per_param": "20"} for i, x in enumerate(c)]
    (fit,) = analyse(rows, "final_val_loss")["miniseries"]
    assert fit["fitted"] and fit["tokens_per_param"] == 20
    assert (fit["E"], fit["A"], fit["alpha"]) == pytest.approx((e, a, alpha), rel=0.01)
    assert fit["alpha_error"] < 0.01


# -- a real sweep -----------------------------------------------------------------------------------

# 3 depths of a microscopic model (width 2 a layer) under 3 budgets: the smallest budget is short of
# one iteration for every depth (3 failed jobs); under the next, the 1-layer model's many steps win
# (an edge: 3.33 against 3.42 and 3.64, as measured); under the largest it has reached its ceiling
# (3.29) and depth 2 is best (3.10, depth 3 3.16): a minimum inside. One thread: the same sums on
# any number of cores.
TINY_SWEEP = [
    "model=depth", "model.aspect_ratio=2", "model.head_dim=2", "model.block_size=32", "system=cpu", "system.num_threads=1",
    "data.batch_size=8", "optim.learning_rate=2e-2", "schedule.warmup_fraction=0.1", "schedule.min_lr=2e-3",
    "eval_interval=100000", "eval_iters=10", "log_interval=100",
]
BUDGETS = [2e5, 4.7e7, 1.9e8]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    """One multirun in one process (Hydra's basic launcher): 3 budgets x depths 1, 2, 3."""
    folder = tmp_path_factory.mktemp("scaling") / "sweep"
    proc = run_script("train.py", "-m", *TINY_SWEEP, f"data.root={data_root}", f"hydra.sweep.dir={folder}",
                      f"flops_budget={','.join(map(str, BUDGETS))}", "model.depth=1,2,3", cwd=folder.parent, check=False)
    assert proc.returncode != 0, proc.stderr  # a failed job fails the sweep, after the others ran
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return folder, rows, json.loads((folder / "scaling.json").read_text()), proc.stdout


@pytest.mark.slow
def test_a_sweep_writes_its_scaling_laws_and_polyfit_agrees(sweep):
    folder, rows, report, stdout = sweep
    assert (folder / "scaling.png").read_bytes()[:4] == b"\x89PNG" and "isoFLOP fits of final_val_loss" in stdout
    edge, inner = report["isoflop"]
    assert [b["flops_budget"] for b in report["isoflop"]] == BUDGETS[1:]  # the first budget ran no job
    # the edge: the smallest depth is best, and nothing is made of it
    assert not edge["fitted"] and "is the smallest model" in edge["reason"] and "n_opt" not in edge
    # the interior minimum, again by an independent polyfit of the summary's own columns
    mine = [r for r in rows if r["flops_budget"] and float(r["flops_budget"]) == BUDGETS[2]]
    n, loss = np.array([float(r["params_non_embedding"]) for r in mine]), [float(r["final_val_loss"]) for r in mine]
    a, b, _ = np.polyfit(np.log(n), loss, 2)
    assert inner["fitted"] and inner["n_opt"] == pytest.approx(math.exp(-b / (2 * a)), rel=1e-9)
    d = np.array([float(r["tokens"]) for r in mine])
    a, b, _ = np.polyfit(np.log(d), loss, 2)
    assert inner["d_opt"] == pytest.approx(math.exp(-b / (2 * a)), rel=1e-9)
    assert inner["d_opt_chinchilla"] == pytest.approx(BUDGETS[2] / (6 * inner["n_opt"]))
    # the failed jobs are left out, each named with its error
    left = {j["job"]: j["reason"] for j in report["left_out"]}
    assert sorted(left) == ["0", "1", "2"] and all("is less than one iteration" in r for r in left.values())


@pytest.mark.slow
def test_each_run_recorded_its_size_and_derived_length(sweep):
    """N, FLOPs per token and max_iters by hand, for each depth d (width 2d, 65 characters, block
    32, 256 tokens an iteration); the FLOPs trained are within half an iteration of the budget."""
    _, rows, _, _ = sweep
    for r in (r for r in rows if r["status"] == "finished"):
        d, c = int(r["overrides"].split("model.depth=")[1].split()[0]), float(r["flops_budget"])
        n = d * 12 * (2 * d) ** 2 + 65 * 2 * d
        fpt = 6 * n + 12 * d * 2 * d * 32
        assert (int(r["params_non_embedding"]), int(r["flops_per_token"])) == (n, fpt)
        assert int(r["iters"]) == math.floor(c / (fpt * 256) + 0.5) and int(r["tokens"]) == int(r["iters"]) * 256
        assert abs(float(r["flops"]) - c) <= fpt * 256 / 2


@pytest.mark.slow
def test_the_command_refits_on_demand(sweep, tmp_path, capsys, monkeypatch):
    """Several sweep folders: the report goes to the first; budgets not fitted exit 0; a metric
    the summaries lack is one line, exit 2."""
    folder, _, report, _ = sweep
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.csv").write_text("job,status,final_val_loss,overrides\n0,finished,2.0,model=tiny\n")
    main([str(folder), str(other), "--metric", "final_val_loss"])
    again = json.loads((folder / "scaling.json").read_text())
    fits = lambda r: [(b["flops_budget"], b["fitted"], b.get("n_opt")) for b in r["isoflop"]]  # noqa: E731
    assert fits(again) == fits(report) and again["sweeps"] == [str(folder), str(other)]
    assert f"{other}/0" in {j["job"] for j in again["left_out"]}
    with pytest.raises(SystemExit) as e:
        main([str(folder), "--metric", "hellaswag/acc"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    # at a sweep's end: nothing for a sweep without budgets; whatever goes wrong is one line, never raised
    assert after_sweep(other) is None
    monkeypatch.setattr("nanogpt.scaling.analyse", lambda *a: 1 / 0)
    assert after_sweep(folder) == f"scaling laws of {folder}: not written (ZeroDivisionError: division by zero)"
