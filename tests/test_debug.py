"""The debug presets (conf/debug/) and the memory figures: each preset run as a user runs it."""

import json
import pickle
import re
import warnings

import pytest
import torch

from conftest import compose_cfg, run_script
from nanogpt import trainer
from nanogpt.checkpoint import find_newest_run, load_checkpoint
from nanogpt.config import to_train_config
from nanogpt.device import memory_mb
from nanogpt.errors import Diverged
from nanogpt.rundir import RunInfo, read_metrics, read_status
from nanogpt.runs import find_runs
from test_tracking import WANDB, offline_run, tensorboard_matches_metrics

# the tiny model on a CPU; unlike conftest's TINY, the preset chooses the iterations and intervals
SMALL = ["model=tiny", "system=cpu", "data.batch_size=4"]


def preset(name: str, data_root, *overrides: str):
    return to_train_config(compose_cfg(f"debug={name}", *SMALL, f"data.root={data_root}", *overrides))


@pytest.mark.slow
def test_fast_exercises_every_part_once_and_is_never_the_newest_run(tmp_path, data_root):
    ordinary = tmp_path / "outputs" / "2026-01-01" / "10-00-00"  # an earlier run, the one sample.py must keep taking
    (ordinary / ".hydra").mkdir(parents=True)
    (ordinary / "ckpt.pt").touch()
    proc = run_script("train.py", "debug=fast", *SMALL, f"data.root={data_root}", "logger=[wandb,tensorboard]",
                      WANDB[1], cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "debug").glob("*/*")

    records = read_metrics(run_dir)
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [2, 4]  # evaluated, and saved at each
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert load_checkpoint(run_dir / "ckpt.pt")["iter_num"] == 4
    read_back = re.search(r"debug.read_back: \S+ckpt.pt holds the trained weights \(\d+ tensors\); sampled from it: '(.*)'",
                          proc.stdout)
    assert read_back and len(read_back.group(1)) == 20, proc.stdout[-2000:]  # characters: a token each
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # both trackers got every record
    assert [h["iter"] for h in offline_run(wandb_run)["history"]] == [r["iter"] for r in records]
    tensorboard_matches_metrics(run_dir)
    assert read_status(run_dir)["status"] == "finished"

    assert find_newest_run(tmp_path / "outputs") == ordinary
    assert [r.folder for r in find_runs([tmp_path / "outputs"])] == [ordinary]
    assert [r.folder for r in find_runs([tmp_path / "outputs" / "debug"])] == [run_dir]  # named: listed


def test_overfit_brings_a_tiny_models_loss_below_0_1(data_root, tmp_path):
    config = preset("overfit", data_root)
    assert config.model.dropout == 0 and config.max_iters <= 300
    trainer.train(config, RunInfo(run_dir=str(tmp_path)))
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert losses[0] > 4 and losses[-1] < 0.1, losses


def test_profile_writes_a_trace_of_the_models_matmuls_and_a_table(data_root, tmp_path, caplog):
    config = preset("profile", data_root)
    with caplog.at_level("INFO"):
        trainer.train(config, RunInfo(run_dir=str(tmp_path)))

    # memory, in every log line and train record (this run logs every iteration)
    assert len(re.findall(r"iter \d+/8: .* [\d,]+ MiB peak rss, eta", caplog.text)) == 8
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(train) == 8 and all(r["mem_peak_mb"] > 0 for r in train)
    assert memory_mb(torch.device("cpu"))["mem_peak_mb"] >= train[-1]["mem_peak_mb"]  # a peak only grows

    events = json.loads((tmp_path / "trace_rank0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::linear", "aten::mm"} <= names
    p = config.debug.profile
    assert {f"ProfilerStep#{s}" for s in range(p.wait + p.warmup, p.wait + p.warmup + p.active)} <= names
    first = p.wait + p.warmup + 1  # counted as the log lines count: "iter n" follows the n-th step
    assert f"profile of iterations {first}-{first + p.active - 1} in {tmp_path / 'trace_rank0.json'}" in caplog.text
    table = caplog.text.split("trace_rank0.json: open it in https://ui.perfetto.dev")[1]
    assert "Self CPU" in table and "aten::mm" in table


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")  # torch's notice to the user
def test_anomaly_names_the_module_of_an_injected_nan(data_root, tmp_path, monkeypatch):
    build_model = trainer.build_model

    def poisoned(*args, **kwargs):
        model = build_model(*args, **kwargs)
        with torch.no_grad():
            model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with pytest.raises(Diverged, match=r"transformer\.h\.1\.mlp\.c_proj's \(Linear\)"):
        trainer.train(preset("anomaly", data_root, "max_iters=3"), RunInfo(run_dir=str(tmp_path)))
    assert "transformer.h.1.mlp.c_proj's (Linear)" in read_status(tmp_path)["error"]
    assert not torch.is_anomaly_enabled()  # switched off again with the run


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_names_the_module_whose_backward_makes_a_nan(data_root, tmp_path, monkeypatch):
    """A NaN that arises in backward only (forward is finite): named by its module, in one line,
    without anomaly mode's forward traceback."""
    build_model = trainer.build_model

    def poisoned(*args, **kwargs):
        model = build_model(*args, **kwargs)
        attn = model.transformer.h[0].attn
        forward = attn.forward
        # 0 * sqrt(u) at u = 0: the value is 0, its gradient 0 * inf = NaN
        attn.forward = lambda x, *a, **k: (lambda y: y + 0 * (y - y.detach()).abs().sqrt())(forward(x, *a, **k))
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Diverged) as e:
        warnings.simplefilter("always")
        trainer.train(preset("anomaly", data_root, "max_iters=3"), RunInfo(run_dir=str(tmp_path)))
    assert str(e.value).startswith("debug.anomaly: the first gradient that is not finite comes from "
                                   "transformer.h.0.attn's (CausalSelfAttention) backward (SqrtBackward0)"), str(e.value)
    assert not [w for w in caught if "Error detected in" in str(w.message)]  # no forward traceback printed
    assert not torch.is_anomaly_enabled()


@pytest.mark.gpu
def test_a_cuda_out_of_memory_writes_a_memory_snapshot_and_says_what_to_lower(data_root, tmp_path, caplog):
    # GPT-2 small's weights alone (~340 MiB in fp32) do not fit under a 256 MiB cap
    config = to_train_config(compose_cfg("model=gpt2_small", "system=cuda", "system.compile=false",
                                         "debug.memory_history=true", f"data.root={data_root}"))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        with caplog.at_level("INFO"), pytest.raises(torch.OutOfMemoryError):
            trainer.train(config, RunInfo(run_dir=str(tmp_path)))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    snapshot = pickle.loads((tmp_path / "memory_snapshot_rank0.pickle").read_bytes())  # plain types: memory_viz reads it
    assert snapshot["segments"] and snapshot["device_traces"]
    assert "memory_snapshot_rank0.pickle" in caplog.text and "Lower data.batch_size" in caplog.text


@pytest.mark.gpu
def test_cuda_memory_allocated_and_reserved_are_recorded(tiny_config, tmp_path):
    trainer.train(tiny_config("system=cuda", "system.compile=false", "max_iters=5"), RunInfo(run_dir=str(tmp_path)))
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert all(0 < r["mem_allocated_mb"] <= r["mem_reserved_mb"] and r["mem_peak_mb"] > 0 for r in train)
