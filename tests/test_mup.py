"""muP (model.parametrization=mup): at the base width it is SP; elsewhere each parameter's init,
rate and decay follow Adam's rule (Tensor Programs V, microsoft/mup's MuAdamW), computed here by
hand from the parameter's name."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from omegaconf import OmegaConf

from conftest import TINY, run_script
from test_fsdp import assert_follows, losses as run_losses, train
from nanogpt.checkpoint import load_checkpoint, model_from_state, weights_file
from nanogpt.export import export
from nanogpt.coord_check import coord_check, split_settings
from nanogpt.config import AdamWConfig, CosineScheduleConfig
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.transfer import transfer_overrides
from nanogpt.optim import build_adamw, cosine_schedule, set_lr

SMALL = dict(block_size=8, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=True)
OPTIONS = [{}, {"tie_embeddings": False}, {"pos_emb": "rope", "qk_norm": True, "norm": "rmsnorm", "bias": False}]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(config: GPTConfig, iters: int = 20) -> tuple[GPT, list[float]]:
    """A model of seed 0 trained iters steps of AdamW (nanogpt's builder, cosine schedule) on a
    fixed random batch (it learns it); the model as built and its losses."""
    torch.manual_seed(0)
    model = GPT(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_adamw(AdamWConfig(learning_rate=1e-2, fused=False), model=model, device_type="cpu")
    schedule = cosine_schedule(CosineScheduleConfig(warmup_iters=5, lr_decay_iters=iters, min_lr=1e-3), learning_rate=1e-2)
    x = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(1))
    out = []
    for it in range(iters):
        set_lr(opt, schedule(it))
        _, loss = model(x, x.roll(-1, 1))
        loss.backward()
        for o in opt:
            o.step()
            o.zero_grad(set_to_none=True)
        out.append(loss.item())
    return initial, out


@pytest.mark.parametrize("options", OPTIONS, ids=["tied", "untied", "modern"])
def test_mup_at_its_base_width_is_sp(options):
    sp_init, sp = losses(GPTConfig(**{**SMALL, **options}))
    mup_init, mup = losses(GPTConfig(**{**SMALL, **options}, parametrization="mup", mup_base_width=32))
    assert sp_init.keys() == mup_init.keys()
    assert all(torch.equal(sp_init[k], mup_init[k]) for k in sp_init)
    assert max(abs(a - b) for a, b in zip(sp, mup)) < 1e-6
    assert sp[-1] < sp[0] - 0.3  # it trained


def expected(name: str, width_mult: float) -> tuple[str, float, float]:
    """Adam's muP rule for a GPT parameter, by its name: (kind, rate scale, init std scale
    relative to SP's at the same width). Hidden matrices (inside blocks, both sides growing):
    rate / m, init std / sqrt(m) (variance ~ 1/fan_in); everything else: as SP."""
    hidden = name.startswith("transformer.h.") and name.endswith(".weight") and "ln_" not in name and "norm" not in name
    if hidden:
        return "hidden", 1 / width_mult, 1 / math.sqrt(width_mult)
    return "other", 1.0, 1.0


def test_each_parameter_follows_the_rule():
    base, width = 32, 128
    config = dict(SMALL, n_embd=width, tie_embeddings=False)
    torch.manual_seed(0)
    sp = GPT(GPTConfig(**config))
    torch.manual_seed(0)
    mup = GPT(GPTConfig(**config, parametrization="mup", mup_base_width=base))
    opt = build_adamw(AdamWConfig(learning_rate=1e-3, weight_decay=0.1, fused=False), model=mup, device_type="cpu")[0]
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    sp_weights = dict(sp.named_parameters())
    names = dict(mup.named_parameters())
    assert len(rate) == len(names)
    m = width / base
    hidden = 0
    for name, p in names.items():
        kind, lr_scale, std_scale = expected(name, m)
        hidden += kind == "hidden"
        lr, wd = rate[id(p)]
        assert lr == pytest.approx(1e-3 * lr_scale), name
        # decay: 2-D weights at the option's, scaled so that rate x decay stays (MuAdamW); vectors none
        assert wd == pytest.approx(0.0 if p.dim() < 2 else 0.1 * m if kind == "hidden" else 0.1), name
        torch.testing.assert_close(p.detach(), sp_weights[name].detach() * std_scale, rtol=1e-6, atol=0, msg=name)
    assert hidden == 4 * SMALL["n_layer"]
    # the hidden init's variance ~ 1/fan_in: c_fc (fan-in 128) at 0.02 / sqrt(4)
    assert mup.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_the_rule_agrees_with_microsoft_mup():
    """microsoft/mup's own bookkeeping (infshapes from a base and a delta model, MuAdamW's groups,
    mup.init's std scale) gives each parameter the rate, decay and init scale ours has. mup has
    no MuReadout here: our readout multiplier sits in GPT._logits, so its check is off."""
    mup = pytest.importorskip("mup", reason="the reference: pip install mup --no-deps (its setup pulls torchvision)")
    config = dict(SMALL, tie_embeddings=False)
    base, delta = GPT(GPTConfig(**config)), GPT(GPTConfig(**dict(config, n_embd=64)))
    torch.manual_seed(0)
    sp = GPT(GPTConfig(**dict(config, n_embd=128)))
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**dict(config, n_embd=128), parametrization="mup", mup_base_width=32))
    mup.set_base_shapes(ours, base, delta=delta, rescale_params=False, do_assert=False)
    reference = mup.MuAdamW(ours.parameters(), lr=1e-3, weight_decay=0.1)
    theirs = {id(p): (g["lr"], g["weight_decay"]) for g in reference.param_groups for p in g["params"]}
    mine = build_adamw(AdamWConfig(learning_rate=1e-3, weight_decay=0.1, fused=False), model=ours, device_type="cpu")[0]
    sp_weights = dict(sp.named_parameters())
    for g in mine.param_groups:
        for p in g["params"]:
            lr, wd = theirs[id(p)]
            assert g["lr"] == pytest.approx(lr)
            assert g["weight_decay"] == pytest.approx(wd if p.dim() > 1 else 0.0)  # we never decay vectors
    for name, p in ours.named_parameters():  # mup.init: std x width_mult^-1/2 for matrix-like weights only
        scale = p.infshape.width_mult() ** -0.5 if p.infshape.ninf() == 2 else 1.0
        torch.testing.assert_close(p.detach(), sp_weights[name].detach() * scale, rtol=1e-6, atol=0, msg=name)


def test_the_multipliers_carry_the_width():
    """logits x base/width and attention scores x sqrt(d_base)/d: a muP model equals an SP model
    of the same weights whose readout and queries are scaled by hand."""
    base, width = 32, 64
    config = dict(SMALL, n_embd=width, tie_embeddings=False, bias=False)
    torch.manual_seed(0)
    mup = GPT(GPTConfig(**config, parametrization="mup", mup_base_width=base))
    sp = GPT(GPTConfig(**config))
    sp.load_state_dict(mup.state_dict())
    d, d_base = width // SMALL["n_head"], base // SMALL["n_head"]
    with torch.no_grad():
        sp.lm_head.weight.mul_(base / width)
        for block in sp.transformer.h:  # q's rows of c_attn: scores q.k / sqrt(d) become q.k sqrt(d_base) / d
            block.attn.c_attn.weight[:width].mul_(math.sqrt(d_base) / d * math.sqrt(d))
    x = torch.randint(0, 65, (2, 8))
    torch.testing.assert_close(mup(x, x)[0], sp(x, x)[0], rtol=1e-5, atol=1e-6)


def test_zero_readout(tiny_config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, tie_embeddings=False, parametrization="mup", mup_zero_readout=True))
    assert model.lm_head.weight.abs().max() == 0


@pytest.mark.parametrize("overrides, message", [
    (["model.parametrization=mup", "optim=muon"], "Muon's orthogonalised updates need another width rule"),
    (["model.parametrization=mup", "model.mup_zero_readout=true"], "set model.tie_embeddings=false"),
    (["model.mup_base_width=16"], "set model.parametrization=mup"),
    (["model.parametrization=mup", "model.mup_base_width=15"], "must be divisible by n_head"),
])
def test_refused_combinations(tiny_config, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(*overrides)


COORD = ["widths=[64,128,256,512]", "steps=5", "model.tie_embeddings=false", "system.num_threads=1"]


@pytest.fixture(scope="module")
def mup_coord_check(tmp_path_factory, data_root):
    """The command, as a user runs it, under muP with a zero readout."""
    run_dir = tmp_path_factory.mktemp("coord") / "mup"
    proc = run_script("nanogpt/coord_check.py", *TINY, f"data.root={data_root}", *COORD,
                      "model.parametrization=mup", "model.mup_zero_readout=true", f"hydra.run.dir={run_dir}",
                      cwd=run_dir.parent)
    return run_dir, proc


@pytest.mark.slow
def test_the_coordinate_check_discriminates(mup_coord_check, tiny_config, tmp_path):
    run_dir, proc = mup_coord_check
    mup = json.loads((run_dir / "coord_check.json").read_text())
    assert (run_dir / "coord_check.png").stat().st_size > 10_000
    for kind in ("attention", "mlp", "residual", "logits"):
        assert abs(mup["slopes"][kind]) < 0.15, (kind, mup["slopes"])
        assert f"{kind:<10} slope {mup['slopes'][kind]:+.3f}" in proc.stdout
    # the slopes are the least-squares fit of the recorded RMS, recomputed here with scipy
    logits_last = [w[-1] for w in mup["activations"]["logits"]]
    fit = scipy.stats.linregress(np.log(mup["widths"]), np.log(logits_last))
    assert mup["slopes"]["logits"] == pytest.approx(fit.slope, abs=1e-9)
    assert len(mup["activations"]["mlp"]) == 4 and len(mup["activations"]["mlp"][0]) == 5
    # each weight's update per width and step; a hidden matrix's shrinks as 1/width under muP (Adam)
    update = mup["updates"]["transformer.h.0.mlp.c_fc.weight"]
    assert scipy.stats.linregress(np.log(mup["widths"]), np.log([w[-1] for w in update])).slope == pytest.approx(-1, abs=0.15)

    settings, _ = split_settings([c for c in COORD if not c.startswith("model.")])
    sp = coord_check(tiny_config("model.tie_embeddings=false", "system.num_threads=1"), settings, tmp_path)
    assert sp["slopes"]["logits"] > 0.3
    assert json.loads((tmp_path / "coord_check.json").read_text())["slopes"] == sp["slopes"]


def test_coord_check_settings_are_checked():
    with pytest.raises(UserError, match=r"widths=\[128, 64\] must be two or more"):
        split_settings(["widths=[128,64]"])
    with pytest.raises(UserError, match="^steps: Value .zero. of type .str. could not be converted to Integer"):
        split_settings(["steps=zero"])


@pytest.mark.slow
def test_transfer_from_a_search_at_the_base_width(tmp_path, data_root):
    """A 2-trial Optuna search of a muP model at width 32, then a run at width 64 pointed at the
    study: its config holds the study's best parameters and the study's base width."""
    optuna = pytest.importorskip("optuna", reason="needs the optuna extra: pip install -e '.[optuna]'")
    common = [*TINY, "system.num_threads=1", f"data.root={data_root}", "max_iters=4", "eval_interval=4"]
    run_script("train.py", "-m", "hparams_search=lr_wd", "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=s",
               *common, "model.parametrization=mup", cwd=tmp_path)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'multirun/s/optuna.db'}")

    run = tmp_path / "big"
    proc = run_script("train.py", "transfer_from=multirun/s", "model.n_embd=64", *common, "max_iters=2",
                      "optim.weight_decay=0.05", f"hydra.run.dir={run}", cwd=tmp_path)
    saved = OmegaConf.load(run / ".hydra/config.yaml")
    assert saved.optim.learning_rate == study.best_params["optim.learning_rate"]
    assert saved.optim.weight_decay == 0.05  # the command's own value wins
    assert (saved.model.parametrization, saved.model.mup_base_width, saved.model.n_embd) == ("mup", 32, 64)
    assert saved.transfer_from == "multirun/s"
    assert f"trial {study.best_trial.number}, value {study.best_value:.4f}, best of 2 finished" in proc.stderr
    assert "optim.learning_rate=" in " ".join(OmegaConf.load(run / ".hydra/overrides.yaml"))


def test_transfer_from_a_folder_without_a_study(tmp_path):
    with pytest.raises(UserError, match=rf"^transfer_from={tmp_path}: no optuna.db there or above it; name the folder"):
        transfer_overrides([f"transfer_from={tmp_path}", "model.n_embd=64"])
    assert transfer_overrides(["transfer_from=null"]) == []


@pytest.mark.slow
def test_a_mup_run_resumes_shards_and_exports_as_any_run(tmp_path, data_root):
    """Width 64 on a base of 32 (multipliers of 2): resumed bit-identically, FSDP on 2 ranks
    following one process, exported to GPT-2 with the same logits."""
    mup = ["model.parametrization=mup", "model.mup_base_width=32", "model.n_embd=64", "model.tie_embeddings=false",
           "max_iters=10", "eval_at_start=true", "schedule.lr_decay_iters=10", "system.num_threads=1"]
    one = tmp_path / "one"
    train(data_root, one, *mup)
    resumed = tmp_path / "resumed"
    train(data_root, resumed, *mup[:-4], "max_iters=5", *mup[-3:])
    train(data_root, resumed, *mup)
    assert run_losses(resumed) == run_losses(one)  # bit-identical
    sharded = tmp_path / "sharded"
    train(data_root, sharded, *mup, "system.parallelism=fsdp", nproc=2)
    assert_follows(sharded, one, tol=1e-4)

    transformers = pytest.importorskip("transformers")
    export(one, tmp_path / "hf")
    ours = model_from_state(load_checkpoint(weights_file(one)))
    assert ours.config.parametrization == "mup" and ours.config.width_mult == 2
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx, idx)[0]).abs().max() < 1e-5
