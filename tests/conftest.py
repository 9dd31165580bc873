"""Shared fixtures: the real conf/ composed through Hydra's compose API, shrunk for a CPU, and
subprocess runs of the real entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# tiktoken downloads its BPE files on first use; offline machines point at a local copy
_cache = ROOT.parent / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# a tiny model that trains in seconds on a CPU
TINY = [
    "model=tiny",
    "system=cpu",
    "data.batch_size=4",
    "max_iters=20",
    "eval_interval=10",
    "eval_iters=2",
    "log_interval=5",
    "schedule.warmup_iters=5",
]


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests (tests/test_gpu.py) skip, saying why, where there is no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Prepared data shared by the whole session (preparation is tested on its own)."""
    return tmp_path_factory.mktemp("data")


# the callback's comparison of the seeded sweep: against the lower learning rate, to a val loss
# its tiny runs cross between their two evaluations or reach at the first
SEEDED_BASELINE, SEEDED_TARGET = "optim.learning_rate=0.001", 3.9


@pytest.fixture(scope="session")
def seeded_sweep(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """A real multirun in one process (the basic launcher): 2 learning rates x 3 seeds of the tiny
    model, bits per byte every 10 iterations; its summary compares the cells. Shared: copy it
    before changing anything in it. (sweep folder, the finished process)"""
    folder = tmp_path_factory.mktemp("seeded") / "sweep"
    proc = run_script(
        "train.py", "-m", *TINY, "system.num_threads=1", f"data.root={data_root}", f"hydra.sweep.dir={folder}",
        "optim.learning_rate=1e-3,2e-3", "system.seed=1,2,3", "eval=[bpb]", "eval.interval=10", "eval.tasks.bpb.tokens=256",
        f"hydra.callbacks.sweep_summary.baseline='{SEEDED_BASELINE}'", f"hydra.callbacks.sweep_summary.target={SEEDED_TARGET}",
        cwd=folder.parent,
    )
    return folder, proc


def compose_cfg(*overrides: str, config_name: str = "config"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def tiny_config(data_root):
    """A function: overrides -> TrainConfig of the tiny CPU run."""
    from nanogpt.config import to_train_config

    def make(*overrides: str):
        return to_train_config(compose_cfg(*TINY, f"data.root={data_root}", *overrides))

    return make


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300, check: bool = True):
    """Run one of the project's scripts (train.py, sample.py, ...) as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def train_run(tmp_path, data_root):
    """A function: overrides -> CompletedProcess of `python train.py` with the tiny CPU settings,
    writing into tmp_path/run (or hydra.run.dir given in overrides)."""

    def run(*overrides: str, run_dir: Path | None = None, **kwargs):
        run_dir = run_dir or tmp_path / "run"
        args = [*TINY, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides]
        return run_script("train.py", *args, cwd=tmp_path, **kwargs)

    return run


def write_core_bundle(folder: Path, tasks: dict[str, dict]) -> Path:
    """A CORE bundle in the DCLM layout (core.yaml, eval_meta_data.csv, eval_data/<uri>): tasks is
    label -> {"kind", "fewshot", "baseline", "rows"[, "delimiter"]}."""
    import json

    import yaml

    (folder / "eval_data" / "mine").mkdir(parents=True, exist_ok=True)
    entries, csv_lines = [], ["Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?"]
    for label, t in tasks.items():
        uri = f"mine/{label}.jsonl"
        (folder / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in t["rows"]))
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [t["fewshot"]], "icl_task_type": t["kind"]}
        if "delimiter" in t:
            entry["continuation_delimiter"] = t["delimiter"]
        entries.append(entry)
        csv_lines.append(f"{label},made up,{t['kind']},{t['fewshot']},{t['baseline']},yes")
    (folder / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    (folder / "eval_meta_data.csv").write_text("\n".join(csv_lines + ["unused_task,x,x,0,50,yes"]) + "\n")
    return folder
