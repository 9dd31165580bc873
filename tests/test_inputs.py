"""Every input checked before work starts: each key's range, the rules that join keys, prepared
data that cannot go stale, one writer per run folder, run folders that are data and not code."""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, compose_cfg
from nanogpt.checks import check
from nanogpt.config import SampleConfig, to_train_config
from nanogpt.errors import UserError
from nanogpt.rundir import read_metrics, read_status


def keys_with_ranges(config, prefix=""):
    """(object, field name, dotted key, rule) for every field that carries a range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("valid") is not None:
            yield config, f.name, f"{prefix}{f.name}", f.metadata["valid"]
        if dataclasses.is_dataclass(value):
            yield from keys_with_ranges(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from keys_with_ranges(v, f"{prefix}{f.name}.{k}.")


def composed_configs():
    """The train config with each option whose schema has keys of its own; sample's; bench's."""
    from bench import BenchSettings

    for overrides in ([], ["optim=muon", "schedule=wsd", "logger=wandb"]):
        yield " ".join(overrides) or "defaults", to_train_config(compose_cfg(*overrides))
    yield "sample", SampleConfig()
    yield "bench", BenchSettings()


def test_every_key_outside_its_range_is_one_line_naming_it():
    seen = set()
    for name, config in composed_configs():
        for i, (_, field_name, key, rule) in enumerate(list(keys_with_ranges(config))):
            bad = copy.deepcopy(config)
            owner = list(keys_with_ranges(bad))[i][0]
            setattr(owner, field_name, rule.outside())
            with pytest.raises(UserError) as e:
                check(bad)
            message = str(e.value)
            assert message.startswith(key) and "\n" not in message, (name, key, message)
            assert f"must be {rule}" in message or "/no/such/file does not exist" in message, message
            seen.add(key)
    # the walk reached every group, sample.py's and bench.py's keys
    for key in ("model.dropout", "data.val_fraction", "optim.beta2", "optim.muon_momentum", "schedule.decay_fraction",
                "system.seed", "logger.wandb.mode", "max_iters", "temperature", "top_k", "iters"):
        assert key in seen, key
    assert len(seen) > 50


def test_defaults_are_in_range():
    for _, config in composed_configs():
        check(config)


def test_temperature_zero_is_greedy_the_same_text_as_top_k_1():
    import torch

    from nanogpt.model import GPT, GPTConfig

    from nanogpt.sampling import Sampling, generate

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    greedy = generate(model, [[0, 0, 0]], 2, 30, Sampling(temperature=0.0))
    assert [r.tokens for r in greedy] == [r.tokens for r in generate(model, [[0, 0, 0]], 2, 30, Sampling(top_k=1))]


# -- prepared data that cannot go stale -------------------------------------------------------------

def text_data(tmp_path, name: str, source: Path, **kw):
    from nanogpt.config import DataConfig

    return DataConfig(name=name, root=str(tmp_path / "data"), source=[str(source)], **kw)


def test_a_data_folder_is_never_used_for_other_sources(tmp_path):
    from nanogpt.data import TokenData
    from nanogpt.prepare import prepare

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abcabcabc\n" * 100)
    b.write_text("xyzxyzxyz\n" * 100)
    prepare(text_data(tmp_path, "x", a))
    assert prepare(text_data(tmp_path, "x", a)) == tmp_path / "data" / "x"  # the same settings: reused
    with pytest.raises(UserError, match=r"was prepared from other data .*b.txt is not the .*a.txt.*data.reprepare=true"):
        prepare(text_data(tmp_path, "x", b))
    with pytest.raises(UserError, match="data.val_fraction was 0.1, now 0.2"):
        prepare(text_data(tmp_path, "x", a, val_fraction=0.2))
    prepare(text_data(tmp_path, "x", b, reprepare=True))  # asked for: prepared again, from b
    assert set(TokenData(text_data(tmp_path, "x", b)).meta["chars"]) == set("xyz\n")
    # the same contents under another path or modification time are the same data
    c = tmp_path / "c.txt"
    c.write_bytes(b.read_bytes())
    prepare(text_data(tmp_path, "x", c))
    assert not [p for p in (tmp_path / "data").iterdir() if p.is_dir() and p.name.startswith(".")]


def test_a_file_that_is_not_text_is_refused(tmp_path):
    from nanogpt.prepare import prepare

    parquet, tokens = tmp_path / "shard.txt", tmp_path / "train.bin"
    parquet.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")  # parquet, under a name that says text
    tokens.write_bytes(bytes([5, 0, 17, 0, 3, 0]) * 100)  # uint16 tokens: NUL bytes
    with pytest.raises(UserError, match="shard.txt is a parquet file, not text"):
        prepare(text_data(tmp_path, "p", parquet))
    with pytest.raises(UserError, match=r"train.bin is binary \(it holds NUL bytes\), not text"):
        prepare(text_data(tmp_path, "t", tokens))
    assert not (tmp_path / "data").exists() or not [p for p in (tmp_path / "data").iterdir() if p.is_dir()]


# -- commands: one line, exit 2, nothing left behind --------------------------------------------------

def command(script: str, *args: str, cwd: Path, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout)


def start(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, timeout=240, what="condition"):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)


def assert_refused(proc, message):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_bad_input_to_each_command_is_one_line_and_leaves_nothing(tmp_path, data_root):
    from nanogpt.prepare import prepare

    (tmp_path / "shard.txt").write_bytes(b"PAR1\x00\x01PAR1")
    (tmp_path / "other.txt").write_text("not Tiny Shakespeare\n" * 100)
    (tmp_path / "prompts.txt").write_text("ROMEO:\n\nJULIET:\n")
    (tmp_path / "sharded_run" / "ckpt").mkdir(parents=True)
    (tmp_path / "sharded_run" / "ckpt" / "latest").write_text("00000100\n")  # a step folder that is not there
    train = [*TINY, f"data.root={data_root}"]
    damaged = text_data(tmp_path, "damaged", tmp_path / "other.txt")  # a prepared folder, one shard cut short
    shard = prepare(damaged) / "train_000000.bin"
    cut = shard.read_bytes()[:-1]
    shard.write_bytes(cut)
    cases = [
        ("train.py", [*train, "optim.beta2=1.0"], "optim.beta2=1.0 must be in [0, 1)"),
        ("train.py", [*train, "data.name=pq", f"data.source=[{tmp_path / 'shard.txt'}]"], "is a parquet file, not text"),
        ("train.py", [*train, f"data.source=[{tmp_path / 'other.txt'}]"], "was prepared from other data"),
        ("train.py", [*TINY, f"data.root={damaged.root}", "data.name=damaged", f"data.source=[{tmp_path / 'other.txt'}]"],
         "train_000000.bin holds"),
        ("train.py", ["-m", "--cfg", "job", *train], "error: Only one of --run, --multirun, --cfg"),  # Hydra's own
        ("sample.py", ["temperature=-1"], "temperature=-1.0 must be >= 0"),
        ("sample.py", ["start=FILE:/no/such/prompt.txt"], "start: /no/such/prompt.txt does not exist"),
        ("sample.py", [f"init_from={tmp_path / 'sharded_run'}"], "ckpt/latest is damaged: it names no complete checkpoint"),
        ("sample.py", [f"prompts_file={tmp_path / 'prompts.txt'}"], "prompts.txt:2: an empty prompt"),
        ("bench.py", [*train, "bench.iters=0"], "bench.iters=0 must be positive"),
    ]
    command("train.py", *train, "max_iters=0", f"hydra.run.dir={tmp_path / 'prepared'}", cwd=tmp_path)  # the data, prepared
    for i, (script, args, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        assert_refused(command(script, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path), message)
        assert read_status(run_dir).get("status") in (None, "failed") and not read_metrics(run_dir)  # never running
    assert not [p for p in Path(data_root).iterdir() if p.is_dir() and (p.name.startswith(".") or p.name == "pq")]
    assert shard.read_bytes() == cut  # the damaged folder is left as it was


@pytest.mark.slow
def test_a_run_folder_naming_foreign_code_is_refused(tmp_path, data_root):
    for i, planted in enumerate(["schedule._target_=builtins.print", "+hydra.callbacks.x._target_=builtins.print"]):
        run_dir = tmp_path / f"run{i}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model=tiny\n- {planted}\n")
        proc = command("train.py", f"resume={run_dir}", f"data.root={data_root}", cwd=tmp_path)
        assert_refused(proc, "which would run code of its own choosing: refused")
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra"]  # nothing ran, nothing written
    # a target typed on the command line is trusted (the user's own): print is refused by the builder contract
    proc = command("train.py", *TINY, f"data.root={data_root}", "schedule._target_=builtins.print",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_refused(proc, "schedule._target_=builtins.print does not take a schedule builder's arguments")


# -- one writer per run folder ------------------------------------------------------------------------

@pytest.mark.slow
def test_one_writer_per_run_folder(tmp_path, data_root):
    """A resume while the run still trains is refused, naming the holder; after kill -9 of the
    holder a resume starts at once; an override the checkpoint cannot honour is named."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.root={data_root}", "max_iters=100000", "eval_interval=5", "log_interval=1"]
    original = start("train.py", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(lambda: (run_dir / "ckpt.pt").exists() and len(read_metrics(run_dir)) >= 7, what="a checkpoint")
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    second = command("train.py", f"resume={run_dir}", "max_iters=5000", cwd=tmp_path)
    assert_refused(second, f"is in use by pid {original.pid} on ")
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides  # the holder's folder untouched
    assert read_status(run_dir)["status"] == "running" and original.poll() is None
    original.send_signal(signal.SIGKILL)
    original.wait()
    from nanogpt.checkpoint import load_checkpoint

    saved = load_checkpoint(run_dir / "ckpt.pt")["iter_num"]
    resumed = command("train.py", f"resume={run_dir}", f"max_iters={saved + 2}", "model.n_layer=3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at iteration {saved}" in resumed.stdout
    assert "model.n_layer=3 is not used: a resumed run keeps its checkpoint's model (model.n_layer=2)" in resumed.stdout


@pytest.mark.slow
def test_two_resumes_started_together_one_trains(tmp_path, data_root):
    run_dir = tmp_path / "run"
    first = command("train.py", *TINY, f"data.root={data_root}", "max_iters=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    procs = [start("train.py", f"resume={run_dir}", "max_iters=100000", cwd=tmp_path) for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in procs), what="one of them to stop")
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    assert loser.returncode == 2 and f"is in use by pid {winner.pid} on " in err, err
    assert winner.poll() is None
    wait_for(lambda: any(r["iter"] > 5 for r in read_metrics(run_dir)), what="the winner training")
    winner.send_signal(signal.SIGINT)
    winner.communicate(timeout=120)
    assert winner.returncode == 128 + signal.SIGINT
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
