"""The stages of the GPU check (scripts/device_check.sh, docs/gpu.md). Each runs the project's own
commands in subprocesses and writes OUT/<stage>.json as soon as it ends (their output goes to
OUT/<stage>.log as it comes); any of them runs alone with --stage.

    python scripts/device_check.py OUT [--stage tests bench nanogpt sample recipe] [--dry]

--dry runs the same commands on a CPU at a tiny size, so that the check is tried before a GPU
machine sees it: the gpu tests are collected and skip, the benchmarks and the recipe train a tiny
model for a few iterations, nanoGPT's bench.py runs on the CPU where a checkout is present.
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from nanogpt.flops import GPU_PEAK_BF16, published_peak
from nanogpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# nanoGPT's bench.py: GPT-2 124M (12 layers, 12 heads, 768 wide, block 1024) without biases, its
# vocabulary padded to 50304, batch 12, random tokens, bf16, compiled. Ours runs the same.
NANOGPT_BENCH = ["--batch_size=12", "--block_size=1024", "--bias=False", "--real_data=False", "--dtype=bfloat16",
                 "--compile=True"]  # fmt: skip
OURS_BENCH = ["model=gpt2_small", "model.bias=false", "model.vocab_pad_multiple=64", "data.batch_size=12",
              "bench.data=synthetic", "system=cuda", "system.dtype=bfloat16", "system.compile=true"]  # fmt: skip
# sample.py's defaults (eager) on GPT-2 124M
OURS_SAMPLE = ["bench.task=sample", "model=gpt2_small", "bench.data=synthetic", "system=cuda", "system.dtype=bfloat16",
               "system.compile=false"]  # fmt: skip
RECIPE = ["experiment=shakespeare_char", "system=cuda"]  # 5000 iterations, bf16, compiled
# nanoGPT's README: "On one A100 GPU this training run takes about 3 minutes and the best
# validation loss is 1.4697"
RECIPE_REFERENCE = {"best_val_loss": 1.4697, "minutes": 3, "card": "A100", "source": "nanoGPT's README"}

# --dry: the same commands at a CPU's size
TINY = ["model=tiny", "system=cpu", "model.vocab_size=100", "data.batch_size=2", "bench.data=synthetic"]
DRY = {
    "bench": [*TINY, "bench.iters=2", "bench.warmup=1"],
    "sample": ["bench.task=sample", *TINY, "bench.prompt_tokens=4", "bench.new_tokens=8", "bench.samples=2"],
    "nanogpt": ["--device=cpu", "--batch_size=1", "--block_size=32", "--real_data=False", "--dtype=float32",
                "--compile=False"],  # fmt: skip
    "recipe": ["experiment=shakespeare_char", "model=tiny", "system=cpu", "data.batch_size=4", "max_iters=20",
               "eval_interval=10", "eval_iters=2", "log_interval=5"],  # fmt: skip
}
# the longest a stage's command may take on the GPU machine (a hang must not take all of its time)
TIMEOUT_S = {"tests": 300, "bench": 240, "nanogpt": 240, "sample": 120, "recipe": 420}


class Check:
    def __init__(self, out: Path, work: Path, dry: bool, nanogpt: Path):
        self.out, self.work, self.dry, self.nanogpt = out, work, dry, nanogpt
        self.commands: list[str] = []

    def run(self, stage: str, cmd: list[str], cwd: Path = ROOT, capture: bool = False) -> tuple[int, str]:
        """cmd's exit status and, with capture, its stdout. Its output goes to OUT/<stage>.log as
        it comes; past the stage's time it is killed with everything it started (pytest's and
        torchrun's children too)."""
        self.commands.append(shlex.join(cmd))
        with open(self.out / f"{stage}.log", "a") as log:
            print(f"$ {shlex.join(cmd)}", file=log, flush=True)
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE if capture else log, stderr=log, text=True,
                                    start_new_session=True)  # fmt: skip
            try:
                stdout, _ = proc.communicate(timeout=TIMEOUT_S[stage])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            log.write(stdout or "")
        return proc.returncode, stdout or ""


def tests(c: Check) -> dict:
    """The gpu-marked tests; on a CPU (--dry) they are collected and must all skip."""
    xml = c.out / "tests.xml"
    code, _ = c.run("tests", [PY, "-m", "pytest", "-m", "gpu", "-rs", f"--junitxml={xml}"])
    cases = junit(xml)
    ran = cases["skipped"] if c.dry else cases["passed"]
    ok = code == 0 and ran and not cases["failed"] and not (c.dry and cases["passed"])
    return {"ok": bool(ok), "returncode": code, **cases}


def junit(xml: Path) -> dict:
    """Test names by outcome from pytest's JUnit XML, failures and skips with their message."""
    cases = {"passed": [], "failed": {}, "skipped": {}}
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = next((e for e in case if e.tag in ("failure", "error")), None)
        skipped = case.find("skipped")
        if problem is not None:
            cases["failed"][name] = problem.get("message", "")
        elif skipped is not None:
            cases["skipped"][name] = skipped.get("message", "").removeprefix("Skipped: ")
        else:
            cases["passed"].append(name)
    return cases


def bench(c: Check, stage: str = "bench", settings: list[str] = OURS_BENCH) -> dict:
    """Our bench.py's figures (tokens/s, MFU against the published and a measured peak, memory)."""
    code, stdout = c.run(stage, [PY, "bench.py", *(DRY[stage] if c.dry else settings), "bench.json=true"], capture=True)
    return {"ok": code == 0, "returncode": code, **(json.loads(stdout) if code == 0 else {})}


def sample(c: Check) -> dict:
    """Prefill and decode tokens/s of the sampling engine, one sample and a batch of 8."""
    return bench(c, "sample", OURS_SAMPLE)


def nanogpt(c: Check) -> dict:
    """nanoGPT's bench.py on the same settings as ours. It prints MFU against an A100's 312
    TFLOP/s; the figure here is against this card's published peak."""
    if not (c.nanogpt / "bench.py").exists():
        return {"ok": True, "skipped": f"no nanoGPT checkout at {c.nanogpt} (docs/gpu.md says how to copy one)"}
    if c.dry:  # its bench.py synchronizes CUDA whatever the device: a no-op on a CPU
        shim = "import runpy, torch; torch.cuda.synchronize = lambda *a: None; runpy.run_path('bench.py', run_name='__main__')"
        cmd = [PY, "-c", shim, *DRY["nanogpt"]]
    else:
        cmd = [PY, "bench.py", *NANOGPT_BENCH]
    code, stdout = c.run("nanogpt", cmd, cwd=c.nanogpt, capture=True)
    found = re.search(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%", stdout)
    if code or not found:
        return {"ok": False, "returncode": code}
    settings = dict(a.removeprefix("--").split("=") for a in cmd if a.startswith("--"))
    ms, mfu_a100 = float(found[1]), float(found[2]) / 100
    peak = published_peak(torch.device("cuda")) if torch.cuda.is_available() else None
    return {
        "ok": True,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "ms_per_iter": ms,
        "tokens_per_s": int(settings["batch_size"]) * int(settings["block_size"]) / ms * 1e3,
        "mfu_as_printed": mfu_a100,  # against the A100's bf16 peak, whatever the card
        "published_peak_tflops": peak / 1e12 if peak else None,
        "mfu_published": mfu_a100 * dict(GPU_PEAK_BF16)["A100"] / peak if peak else None,
    }


def recipe(c: Check) -> dict:
    """nanoGPT's Shakespeare char recipe in full: final and best val loss, wall time."""
    run_dir = c.work / "recipe"
    args = [*(DRY["recipe"] if c.dry else RECIPE), f"data.root={c.work / 'data'}", f"hydra.run.dir={run_dir}"]
    t0 = time.monotonic()
    code, _ = c.run("recipe", [PY, "train.py", *args])
    wall_s = time.monotonic() - t0
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy(run_dir / "metrics.jsonl", c.out / "recipe-metrics.jsonl")
    metrics = read_metrics(run_dir) if run_dir.exists() else []
    val = [r["val_loss"] for r in metrics if r["kind"] == "eval"]
    return {
        "ok": code == 0 and bool(val) and all(math.isfinite(v) for v in val),
        "returncode": code,
        "iters": metrics[-1]["iter"] if metrics else 0,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "wall_s": wall_s,  # start-up, data preparation and compilation included
        "train_time_s": metrics[-1]["train_time_s"] if metrics else None,
        "reference": RECIPE_REFERENCE,
    }


STAGES = {"tests": tests, "bench": bench, "nanogpt": nanogpt, "sample": sample, "recipe": recipe}


def environment() -> dict:
    import hydra
    import omegaconf

    cuda = torch.cuda.is_available()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True) if shutil.which("git") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hydra": f"{hydra.__version__} from {Path(hydra.__file__).parent}",
        "omegaconf": f"{omegaconf.__version__} from {Path(omegaconf.__file__).parent}",
        "commit": commit.stdout.strip() if commit and commit.returncode == 0 else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="folder for the figures (default: $OUT)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="run only these")
    p.add_argument("--dry", action="store_true", help="the CPU-safe part of each stage, on a tiny model")
    p.add_argument("--nanogpt", type=Path, default=ROOT / ".nanogpt-ref", help="a nanoGPT checkout")
    a = p.parse_args()
    if not a.out:
        p.error("name an output folder (or set OUT)")
    if not a.dry and not torch.cuda.is_available():
        p.error("no CUDA device here: --dry runs the check's CPU-safe parts")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1), flush=True)

    failed = []
    with tempfile.TemporaryDirectory(prefix="device-check-") as work:
        for stage in a.stage:
            c = Check(out, Path(work), a.dry, a.nanogpt.resolve())
            t0 = time.monotonic()
            try:
                figures = STAGES[stage](c)
            except Exception as e:  # a timeout, unreadable output: recorded, and the next stage runs
                figures = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            figures = {"stage": stage, "dry": a.dry, "seconds": time.monotonic() - t0, **figures, "commands": c.commands}
            (out / f"{stage}.json").write_text(json.dumps(figures, indent=1) + "\n")
            print(f"== {stage}: {'ok' if figures['ok'] else 'FAILED'} in {figures['seconds']:.0f} s -> {out / stage}.json "
                  f"(output: {stage}.log)\n{json.dumps(figures)}", flush=True)  # fmt: skip
            if not figures["ok"]:
                failed.append(stage)
    print(f"== failed: {' '.join(failed)}" if failed else "== all stages ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
