"""scripts/device_check.sh, tried on a CPU before a GPU machine runs it: --dry installs the wheels,
finds the gpu tests and runs the CPU-safe part of every stage (docs/gpu.md)."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

WHEELS = ROOT.parent / "shared" / "gpu" / "wheels"  # what the GPU machine is given in .whl/
STAGES = ["tests", "bench", "nanogpt", "sample", "recipe"]

# stands in for nanoGPT's bench.py: its last line, as nanoGPT prints it
NANOGPT_BENCH = 'print("19/20 loss: 0.0233")\nprint("time per iteration: 16.0000ms, MFU: 1.00%")\n'


def device_check(*args: str, wheels=WHEELS) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHEELS": str(wheels), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not WHEELS.is_dir(), reason=f"no wheels at {WHEELS}")
def test_dry_run_writes_every_stages_figures_and_a_stage_reruns_alone(tmp_path):
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "bench.py").write_text(NANOGPT_BENCH)
    out = tmp_path / "out"
    proc = device_check(str(out), "--dry", "--nanogpt", str(tmp_path / "nanoGPT"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== all stages ok" in proc.stdout

    env = json.loads((out / "env.json").read_text())
    assert "site-packages" not in env["hydra"]  # Hydra came from the wheels' temporary folder
    figures = {stage: json.loads((out / f"{stage}.json").read_text()) for stage in STAGES}
    assert all(f["ok"] and f["dry"] and f["commands"] for f in figures.values())
    skipped = {name: why for name, why in figures["tests"]["skipped"].items() if name.startswith("tests.test_gpu::")}
    assert "tests.test_gpu::test_kill_9_then_resume_is_bit_identical_on_cuda" in skipped
    assert set(skipped.values()) == {"needs a CUDA device"} and not figures["tests"]["passed"]
    assert figures["bench"]["tokens_per_s"] > 0
    assert figures["sample"]["decode_tokens_per_s_2"] > 0
    assert figures["nanogpt"]["tokens_per_s"] == pytest.approx(1 * 32 / 0.016)  # batch x block of --dry, per 16 ms
    assert figures["nanogpt"]["mfu_as_printed"] == 0.01 and figures["nanogpt"]["mfu_published"] is None  # no GPU's peak
    recipe = figures["recipe"]
    assert recipe["iters"] == 20 and math.isfinite(recipe["final_val_loss"]) and recipe["wall_s"] > 0
    assert (out / "recipe-metrics.jsonl").exists() and (out / "recipe.log").exists()

    again = tmp_path / "again"
    proc = device_check(str(again), "--dry", "--stage", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in again.iterdir()) == ["bench.json", "bench.log", "env.json"]


def test_without_wheels_or_with_torch_among_them_it_stops_before_running(tmp_path):
    proc = device_check(str(tmp_path / "out"), "--dry", wheels=tmp_path)
    assert proc.returncode == 2 and "no wheels in" in proc.stderr
    (tmp_path / "torch-2.11.0-cp312-cp312-linux_x86_64.whl").touch()
    proc = device_check(str(tmp_path / "out"), "--dry", wheels=tmp_path)
    assert proc.returncode == 2 and "the machine's own torch is used" in proc.stderr
    assert not (tmp_path / "out").exists()
