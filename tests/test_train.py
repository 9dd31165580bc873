"""Training end to end on a tiny model: pinned losses, run folder, resume, sampling."""

import re

import pytest
import torch

from conftest import run_script
from nanogpt.checkpoint import load_checkpoint
from nanogpt.rundir import RunInfo, read_metrics, read_status
from nanogpt.trainer import train

# the first 10 training losses of the seeded tiny model (model=tiny, batch 4, seed 1337, fp32)
PINNED = [4.1682, 4.1801, 4.1644, 4.1362, 4.1135, 4.0610, 4.0500, 3.9845, 3.9815, 3.9648]


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_first_losses_of_a_seeded_tiny_model_are_pinned(tiny_config, tmp_path):
    config = tiny_config("max_iters=10", "log_interval=1", "eval_interval=100", "data.prefetch=false")
    train(config, RunInfo(run_dir=str(tmp_path)))
    assert train_losses(tmp_path) == pytest.approx(PINNED, abs=2e-4)


def test_bf16_autocast_on_cpu_follows_the_fp32_losses(tiny_config, tmp_path, caplog):
    # system=cpu_fast runs bf16 where the CPU multiplies it fast; forced here, on any CPU
    config = tiny_config("system.dtype=bfloat16", "max_iters=10", "log_interval=1", "eval_interval=100", "data.prefetch=false")
    with caplog.at_level("INFO"):
        train(config, RunInfo(run_dir=str(tmp_path)))
    assert "dtype bfloat16" in caplog.text and "measured bfloat16 matmul" in caplog.text
    assert train_losses(tmp_path) == pytest.approx(PINNED, abs=0.02)


def test_run_folder_holds_config_log_checkpoint_metrics_status(train_run, tmp_path):
    proc = train_run()
    run = tmp_path / "run"
    assert "step 20: train loss" in proc.stdout
    assert re.search(r"start-up [\d.]+ s to the first iteration", proc.stdout), proc.stdout
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "ckpt.pt", "metrics.jsonl", "status.json"):
        assert (run / name).exists(), name
    assert read_status(run)["status"] == "finished"
    state = load_checkpoint(run / "ckpt.pt")
    assert state["iter_num"] == 20 and state["config"]["model"]["n_layer"] == 2
    assert state["provenance"]["versions"]["torch"] == torch.__version__
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [10, 20]
    assert state["best_val_loss"] == min(r["val_loss"] for r in evals)


def test_resume_continues_at_the_saved_iteration_with_the_same_optimizer_state(train_run, tmp_path):
    train_run("max_iters=10")
    before = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    proc = train_run("max_iters=20")  # same folder: its checkpoint wins over init_from
    assert "resuming at iteration 10" in proc.stdout
    iters = [r["iter"] for r in read_metrics(tmp_path / "run")]
    assert iters == sorted(iters) and iters[-1] == 20
    after = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert after["iter_num"] == 20
    # the resumed optimizer continued the saved one: Adam's step count went on from 10
    assert before["optimizers"]["state"]["transformer.h.0.mlp.c_fc.weight"]["step"].item() == 10  # by parameter name
    assert after["optimizers"]["state"]["transformer.h.0.mlp.c_fc.weight"]["step"].item() == 20


def test_optimizer_state_saved_by_position_loads_by_parameter_name():
    """Checkpoints before sharding kept optimizer.state_dict() (parameters numbered); they still resume."""
    from nanogpt.checkpoint import optimizer_state, set_optimizer_state
    from nanogpt.config import MuonConfig
    from nanogpt.model import GPT, GPTConfig
    from nanogpt.optim import build_muon

    def trained():
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
        optimizers = build_muon(MuonConfig(), model=model, device_type="cpu")  # two optimizers
        return model, optimizers

    model, optimizers = trained()
    _, loss = model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    loss.backward()
    for opt in optimizers:
        opt.step()
    old_layout = [opt.state_dict() for opt in optimizers]
    fresh_model, fresh = trained()
    set_optimizer_state(fresh_model, fresh, old_layout, full=True)
    a, b = optimizer_state(model, optimizers, full=True), optimizer_state(fresh_model, fresh, full=True)
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(model.parameters()))
    for name, state in a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][name][k])) for k, v in state.items())


def test_resume_by_folder_reuses_the_runs_overrides(train_run, tmp_path):
    train_run("max_iters=10", "model.n_embd=48")
    proc = run_script("train.py", f"resume={tmp_path / 'run'}", "max_iters=20", cwd=tmp_path)
    assert "resuming at iteration 10" in proc.stdout
    state = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert state["iter_num"] == 20 and state["model_args"]["n_embd"] == 48


def test_eval_only_evaluates_and_stops(train_run, tmp_path):
    proc = train_run("eval_only=true")
    assert "step 0: train loss" in proc.stdout and "iter " not in proc.stdout


def test_keep_best_when_not_always_saving(train_run, tmp_path):
    train_run("always_save_checkpoint=false")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert best["best_val_loss"] == last["best_val_loss"] and last["iter_num"] == 20


def test_sample_prints_text_from_a_tiny_checkpoint(train_run, tmp_path):
    train_run()
    proc = run_script(
        "sample.py", f"init_from={tmp_path / 'run'}", "num_samples=2", "max_new_tokens=40", "start=ROMEO:",
        "device=cpu", cwd=tmp_path,
    )
    samples = [s for s in proc.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("ROMEO:") for s in samples)
    assert all(len(s.strip()) == len("ROMEO:") + 40 for s in samples)  # characters: one token each
    assert not (tmp_path / "outputs").exists()  # sampling writes no run folder


@pytest.mark.slow
def test_cpu_recipe_reaches_nanogpts_val_loss(tmp_path, data_root):
    """nanoGPT's README CPU recipe (the default run): val loss <= 1.90 at iteration 2000."""
    proc = run_script("train.py", f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=1800)
    final = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert final["iter"] == 2000 and final["val_loss"] <= 1.90, proc.stdout[-2000:]
