"""The example project of your own code (examples/own_code, docs/extend.md), installed as a user
installs their package: copied outside the repository and `pip install -e`'d into a virtual
environment that sees this one's packages. Its Lion optimizer, inverse-sqrt schedule, SwiGLU GPT
and next-line task train, resume bit-identically, sweep, sample, evaluate and shard over 2 ranks;
a run folder naming its code is data until the command trusts it."""

import csv
import json
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from nanogpt.export import export
from nanogpt.rundir import read_metrics, read_status

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "own_code"
SWIGLU = "myresearch.model.SwiGLUGPT"


@dataclass
class User:
    python: Path  # the virtual environment's, where the package is installed
    conf: Path  # the example's config folder, in the user's copy
    home: Path

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command as the user types it: a script of the repository, or -m <module>."""
        args = [str(ROOT / a) if a.endswith(".py") else a for a in args]
        proc = subprocess.run([str(self.python), *args], cwd=self.home, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> User:
    home = tmp_path_factory.mktemp("user")
    shutil.copytree(EXAMPLE, home / "own_code", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], check=True)
    python = home / "venv" / "bin" / "python"
    # it sees this environment's packages (torch, hydra, pip...), whether they sit in a venv or in
    # the system's (--system-site-packages would reach the base interpreter's only)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_outer.pth").write_text("import site; " + "; ".join(
        f"site.addsitedir({d!r})" for d in [*site.getsitepackages(), site.getusersitepackages()]) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                    str(home / "own_code")], check=True, capture_output=True)
    return User(python, home / "own_code" / "conf", home)


def tiny(user: User, data_root: Path, *extra: str) -> list[str]:
    """The example's experiment at a size that trains in seconds, with its task scored in training."""
    return ["--config-dir", str(user.conf), "experiment=lion_swiglu", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32", "model.block_size=32", "system=cpu", "data.batch_size=4", f"data.root={data_root}",
            "eval_interval=10", "eval_iters=2", "log_interval=5", "schedule.warmup_iters=5", "eval.interval=10",
            "eval.tasks.next_line.examples=20", *extra]


@pytest.fixture(scope="module")
def trained(user, data_root) -> Path:
    run = user.home / "straight"
    user.run("train.py", *tiny(user, data_root, "max_iters=20", f"hydra.run.dir={run}"))
    return run


def evals(run: Path) -> list[dict]:
    """Its evaluations (the start record says how long each command asked it to train)."""
    return [{k: v for k, v in m.items() if k != "train_time_s"} for m in read_metrics(run) if m["kind"] not in ("train", "start")]


def test_the_example_trains_with_its_own_model_optimizer_schedule_and_task(trained):
    state = load_checkpoint(trained / "ckpt.pt")
    assert state["model_args"]["_target_"] == SWIGLU and state["config"]["optim"]["_target_"] == "myresearch.optim.build_lion"
    assert "transformer.h.0.mlp.c_fc.weight" in state["model"] and state["model"]["transformer.h.0.mlp.c_fc.weight"].shape == (2 * 96, 32)  # 8/3 x 32 up to 96
    # Lion's one state tensor per parameter (AdamW would have exp_avg_sq and a step count)
    assert set(state["optimizers"]["state"]["transformer.h.0.mlp.c_fc.weight"]) == {"exp_avg"}
    tasks = [m for m in read_metrics(trained) if m["kind"] == "tasks"]
    assert [m["iter"] for m in tasks] == [10, 20] and all(0 <= m["next_line/acc"] <= 1 for m in tasks)
    lrs = {m["iter"]: m["lr"] for m in read_metrics(trained) if m["kind"] == "train"}
    assert lrs[20] == pytest.approx(2e-4 * (5 / 19) ** 0.5)  # the inverse-sqrt schedule at iteration 19


def test_the_example_resumes_bit_identically(user, trained, data_root):
    run = user.home / "resumed"
    user.run("train.py", *tiny(user, data_root, "max_iters=10", f"hydra.run.dir={run}"))
    user.run("train.py", "--config-dir", str(user.conf), f"resume={run}", "max_iters=20")
    assert evals(run) == evals(trained)
    a, b = (load_checkpoint(r / "ckpt.pt") for r in (trained, run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizers"]["state"][k]["exp_avg"], b["optimizers"]["state"][k]["exp_avg"])
               for k in a["optimizers"]["state"])


def test_a_two_job_sweep_of_the_example_writes_its_summary(user, data_root):
    sweep = user.home / "sweep"
    proc = user.run("train.py", "-m", *tiny(user, data_root, "max_iters=10", "system.num_threads=1",
                                            "optim.learning_rate=0.0001,0.0004", f"hydra.sweep.dir={sweep}"))
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["overrides"].split()[-1] for r in rows) == ["optim.learning_rate=0.0001", "optim.learning_rate=0.0004"]
    assert all(r["status"] == "finished" for r in rows) and "2 jobs" in proc.stdout


def test_sample_and_eval_rebuild_the_users_model_when_the_command_trusts_its_package(user, trained, data_root):
    refused = user.run("sample.py", f"init_from={trained}", "max_new_tokens=5", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {trained}/ckpt.pt names {SWIGLU}: a run folder cannot make a command import code; if it is yours, "
        "add extensions=[myresearch] to the command"]
    sampled = user.run("sample.py", f"init_from={trained}", "max_new_tokens=5", "num_samples=2", "format=json",
                       "extensions=[myresearch]")
    assert [len(json.loads(line)["text"]) for line in sampled.stdout.splitlines()] == [6, 6]  # "\n" + 5 characters
    out = user.home / "eval"
    user.run("-m", "nanogpt.eval", "--config-dir", str(user.conf), f"init_from={trained}", "extensions=[myresearch]",
             "eval=[next_line]", "eval.tasks.next_line.examples=20", "system=cpu", f"data.root={data_root}",
             f"hydra.run.dir={out}")
    scores = json.loads((out / "eval.json").read_text())["scores"]
    assert scores["next_line/acc"] == [m for m in read_metrics(trained) if m["kind"] == "tasks"][-1]["next_line/acc"]
    with pytest.raises(UserError, match=f"cannot export {trained} as GPT-2: its model is {SWIGLU}, not nanogpt's GPT"):
        export(trained, user.home / "hf")  # refused before anything is imported


def test_the_example_under_fsdp_on_two_ranks_from_its_checkpoint(user, trained, data_root):
    """torchrun's second rank composes the user's config folder too; the model comes from a run of
    the user's class, imported because the command lists its package."""
    run = user.home / "fsdp"
    args = ["--config-dir", str(user.conf), "optim=lion", "schedule=inverse_sqrt", f"init_from={trained}",
            "extensions=[myresearch]", "system.device=cpu", "system.parallelism=fsdp", "gradient_accumulation_steps=2",
            "data.batch_size=2", f"data.root={data_root}", "max_iters=4", "eval_interval=4", "eval_iters=2",
            "log_interval=1", "schedule.warmup_iters=2", f"hydra.run.dir={run}"]
    user.run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *args)
    assert read_status(run)["status"] == "finished"
    state = load_checkpoint(run / "ckpt" / (run / "ckpt" / "latest").read_text().strip() / "train_state.pt")
    assert state["model_args"]["_target_"] == SWIGLU and state["iter_num"] == 4


def test_a_run_folders_target_of_the_users_package_is_refused_with_nothing_written(user, data_root):
    run = user.home / "planted"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=tiny\n- optim._target_=myresearch.optim.build_lion\n")
    proc = user.run("train.py", f"resume={run}", f"data.root={data_root}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {run}/.hydra/overrides.yaml holds 'optim._target_=myresearch.optim.build_lion', which would run code "
        "of its own choosing: refused; if that code is yours, add extensions=[myresearch] to the command"]
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]


BAD_CODE = '''
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BareConfig:
    _target_: str = "mycode.Bare"
    block_size: int = 32
    vocab_size: int | None = None
    n_layer: int = 1


class Bare(nn.Module):  # no blocks, no param_groups
    def __init__(self, config: BareConfig):
        super().__init__()
        self.config, self.emb = config, nn.Embedding(config.vocab_size, 8)

    def forward(self, idx, targets=None, cache=None):
        return self.emb(idx), None


def build_sgd(c, *, model, device_type):  # untyped: reads its option's keys by attribute
    return torch.optim.SGD(model.parameters(), lr=c.learning_rate, momentum=c.momentum)
'''


def test_a_missing_protocol_member_an_unimportable_target_and_an_unknown_key_are_one_line_before_any_work(
        tmp_path, data_root):
    from conftest import TINY, run_script

    (tmp_path / "mycode.py").write_text(BAD_CODE)
    for group, name, text in [("model", "bare", "_target_: mycode.Bare\nblock_size: 32\n"),
                              ("optim", "sgd", "_target_: mycode.build_sgd\nlearning_rate: 0.1\nmomentun: 0.9\n")]:
        (tmp_path / "conf" / group).mkdir(parents=True)
        (tmp_path / "conf" / group / f"{name}.yaml").write_text(text)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cases = [
        (["model=bare"], "model._target_=mycode.Bare lacks blocks (an nn.ModuleList of the repeated layers), "
                         "param_groups() (e.g. return nanogpt.protocol.default_param_groups(self)): the model protocol, "
                         "docs/extend.md"),
        (["optim._target_=mycode.no_such.build"], "optim._target_=mycode.no_such.build: cannot import module "
                                                  "mycode.no_such (No module named 'mycode.no_such'; 'mycode' is not a package)"),
        (["optim=sgd"], "optim.momentum: read by mycode.build_sgd, but optim has no such key (it has learning_rate, momentun)"),
    ]
    for i, (args, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        proc = run_script("train.py", "--config-dir", str(tmp_path / "conf"), *TINY, f"data.root={data_root}", *args,
                          f"hydra.run.dir={run}", cwd=tmp_path, env=env, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
        assert not read_metrics(run) and not (run / "ckpt.pt").exists()  # no iteration, nothing saved
