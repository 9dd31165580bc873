"""wandb and TensorBoard tracking of a real tiny run (wandb offline), its resume, its failures; the
console and metrics.jsonl."""

import json
import logging
import signal
import struct
import sys

import numpy as np
import pytest

from faults import PAUSE_BEFORE_CHECKPOINT_RENAME, inject
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import TensorBoardConfig, WandbConfig
from nanogpt.rundir import RunInfo, read_metrics
from nanogpt.tracking import WandbTracker, start_tensorboard, start_trackers, start_wandb
from test_reliability import start, train_cmd, wait_for

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # wandb keys are 40 hex characters
WANDB = ["logger=wandb", "logger.wandb.mode=offline"]


def wandb_records(path):
    """The protobuf records of a .wandb file: a LevelDB-style log (wandb's own format) of 32 KiB
    blocks holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(path) -> dict:
    """id, config, final summary and history rows of one offline-run-* folder."""
    (file,) = path.glob("run-*.wandb")
    run = {"id": None, "config": {}, "summary": {}, "history": []}
    for r in wandb_records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["id"] = r.run.run_id
            run["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "summary":
            for u in r.summary.update:
                run["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run


def files_containing(folder, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.slow
def test_offline_wandb_run_has_config_summary_and_resumes_the_same_run(train_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_run(*WANDB, env={"WANDB_API_KEY": FAKE_KEY})

    # console: the composed config as YAML, then readable progress lines (also in train.log)
    assert "config:\nmodel:\n  block_size: 32" in proc.stdout
    assert "iter 20/20: loss" in proc.stdout and "tok/s" in proc.stdout and "mfu" in proc.stdout and "eta" in proc.stdout
    assert "\r" not in proc.stdout
    assert "config:\nmodel:" in (run_dir / "train.log").read_text()

    # metrics.jsonl: the documented keys, iterations in order
    records = read_metrics(run_dir)
    train_keys = {"iter", "kind", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_s", "mfu", "tokens", "flops",
                  "train_time_s", "mem_peak_mb"}
    assert all(set(r) == train_keys for r in records if r["kind"] == "train")
    evals = [r for r in records if r["kind"] == "eval"]
    assert all(set(r) == {"iter", "kind", "train_loss", "val_loss", "tokens", "flops", "train_time_s"} for r in evals)
    assert [set(r) for r in records if r["kind"] == "start"] == [{"iter", "kind", "params", "params_non_embedding",
                                                                  "flops_per_token", "tokens_per_iter", "max_iters",
                                                                  "tokens", "flops", "train_time_s"}]
    iters = [r["iter"] for r in records]
    assert iters == sorted(iters) and iters[-1] == 20

    (first,) = (run_dir / "wandb").glob("offline-run-*")
    run = offline_run(first)
    assert {"model", "data", "optim", "schedule", "system", "logger", "max_iters"} <= set(run["config"])
    assert run["config"]["model"]["n_layer"] == 2 and run["config"]["max_iters"] == 20
    assert run["summary"]["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert run["summary"]["train_loss"] == pytest.approx(evals[-1]["train_loss"])
    assert run["summary"]["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert [h["iter"] for h in run["history"]] == iters
    assert not any("kind" in h for h in run["history"])  # a string column would only clutter wandb

    # resume in the same folder: the checkpoint's wandb id continues the same run
    train_run(*WANDB, "max_iters=30", env={"WANDB_API_KEY": FAKE_KEY})
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    resumed = offline_run(folders[1])
    assert resumed["id"] == run["id"]
    assert [h["iter"] for h in resumed["history"]][-1] == 30
    assert files_containing(run_dir, FAKE_KEY) == []  # the API key never lands in the run folder


def test_a_checkpoint_from_before_the_tracker_set_continues_its_wandb_run(tmp_path):
    """Checkpoints written before several trackers were possible keep wandb's run id as `wandb_id`."""
    import torch

    from nanogpt.checkpoint import Checkpointer, TrainState
    from nanogpt.distributed import DistInfo
    from nanogpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    checkpointer = Checkpointer(tmp_path, model, [torch.optim.AdamW(model.parameters())],
                                torch.amp.GradScaler("cpu", enabled=False), DistInfo())
    checkpointer.save(TrainState(iter_num=5, tracker_ids={"wandb": "abc123"}))
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    old = {k: v for k, v in saved.items() if k != "tracker_ids"} | {"wandb_id": "abc123"}
    assert checkpointer.restore(saved).tracker_ids == checkpointer.restore(old).tracker_ids == {"wandb": "abc123"}
    assert checkpointer.restore(old | {"wandb_id": None}).tracker_ids == {}  # a run that had no wandb


@pytest.mark.slow
def test_wandb_that_cannot_start_online_warns_once_and_training_goes_on(train_run, tmp_path, monkeypatch):
    # no key anywhere (a fresh HOME and config dir) and an unreachable server: wandb.init fails
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "2"}
    proc = train_run("logger=wandb", "logger.wandb.mode=online", env=env)
    assert "iter 20/20: loss" in proc.stdout
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("wandb could not start online") == 1
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # the offline fallback


def test_init_failure_in_every_mode_gives_no_tracker_and_one_warning(monkeypatch, tmp_path, caplog):
    import wandb

    def fail(**kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", fail)
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        tracker = start_wandb(WandbConfig(mode="online"), config={}, run=RunInfo(str(tmp_path)), resume_id=None)
    assert tracker is None
    assert len(caplog.records) == 1
    assert "online: RuntimeError: no wandb today; offline: RuntimeError" in caplog.text


def test_a_failing_log_call_warns_once_and_later_calls_are_skipped(caplog):
    class BrokenRun:
        id = "abc"
        calls = 0

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, metrics):
            BrokenRun.calls += 1
            raise OSError("wandb-core went away")

    tracker = WandbTracker(BrokenRun())
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        tracker.log({"iter": 1, "loss": 4.0})
        tracker.log({"iter": 2, "loss": 3.9})
    assert BrokenRun.calls == 1 and len(caplog.records) == 1


def test_logger_none_and_disabled_build_no_tracker(tmp_path, tiny_config):
    run = RunInfo(str(tmp_path))
    assert start_trackers(tiny_config("logger=none").logger, config={}, run=run, resume_ids={}) == {}
    assert start_wandb(WandbConfig(mode="disabled"), config={}, run=run, resume_id=None) is None


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) pairs as TensorBoard itself reads the event files, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_matches_metrics(run_dir) -> None:
    """TensorBoard holds every value of metrics.jsonl once, as <kind>/<key> at its iteration, in
    float32 (what TensorBoard stores); and the config as hyper-parameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    expected = {}
    for r in read_metrics(run_dir):
        for key, value in r.items():
            if key not in ("iter", "kind"):
                expected.setdefault(f"{r['kind']}/{key}", []).append((r["iter"], float(np.float32(value))))
    assert tensorboard_scalars(run_dir) == expected
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    hparams = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hparams.session_start_info.hparams["model.n_layer"].number_value == 2


@pytest.mark.slow
def test_tensorboard_after_a_kill_and_a_resume_holds_each_step_once(train_run, tmp_path, data_root):
    """A run killed after logging iterations past its checkpoint logs them again when resumed:
    TensorBoard shows each once (the writer's purge_step), with metrics.jsonl's values."""
    run_dir, args = tmp_path / "run", ["logger=tensorboard", "eval_interval=5", "log_interval=1"]
    train_run(*args, "max_iters=5")
    # resumed, it pauses in its next save (iteration 10) with iterations 6-10 logged; killed there
    proc = start(train_cmd(data_root, run_dir, *args, "max_iters=20"), tmp_path,
                 env=inject(tmp_path, PAUSE_BEFORE_CHECKPOINT_RENAME))
    wait_for(lambda: (run_dir / "ckpt.pt.paused").exists() or proc.poll() is not None, what="the save at iteration 10")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run_dir / "ckpt.pt")["iter_num"] == 5
    assert [step for step, _ in tensorboard_scalars(run_dir)["train/loss"]] == list(range(1, 11))

    train_run(*args, "max_iters=15")
    assert [step for step, _ in tensorboard_scalars(run_dir)["train/loss"]] == list(range(1, 16))
    assert [step for step, _ in tensorboard_scalars(run_dir)["eval/val_loss"]] == [5, 10, 15]
    tensorboard_matches_metrics(run_dir)


def test_tensorboard_not_installed_warns_and_gives_no_tracker(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails, as without the package
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        tracker = start_tensorboard(TensorBoardConfig(), config={}, run=RunInfo(str(tmp_path)), resume_id=None,
                                    resume_iter=None)
    assert tracker is None and "pip install -e '.[tensorboard]'" in caplog.text
