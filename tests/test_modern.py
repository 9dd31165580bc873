"""The modern recipe: each model option changes the forward pass as intended, Muon's update is
close to orthogonal, and a run with Muon resumes exactly."""

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, compose_cfg
from nanogpt.config import MuonConfig, WSDScheduleConfig, to_train_config
from nanogpt.flops import params
from nanogpt.model import GPT, MLP, CausalSelfAttention, GPTConfig, Rotary, make_norm
from nanogpt.optim import Muon, build_muon

MODERN = dict(
    pos_emb="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False, logit_softcap=15.0,
    zero_init_proj=True,
)


def config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, bias=False), **kw})


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(config(**kw))


def test_all_options_together_keep_shapes_and_train():
    model = tiny(**MODERN)
    assert "wpe" not in model.transformer  # rotary replaces the learned positions
    assert model.lm_head.weight is not model.transformer.wte.weight
    n_tied = params(tiny()) - 16 * 32  # the same model's size without wpe
    assert params(model) > n_tied  # the untied head adds vocab x n_embd
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.zeros_like(logits))  # zero-initialised untied head: uniform
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rmsnorm_scales_to_unit_rms_without_centring():
    x = torch.randn(4, 8, 32) * 5 + 3
    y = make_norm(config(norm="rmsnorm"), 32)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 8), atol=1e-4, rtol=0)
    assert y.mean(-1).abs().min() > 0.1  # the mean survives: not a LayerNorm
    centred = make_norm(config(norm="layernorm"), 32)(x)
    torch.testing.assert_close(centred.mean(-1), torch.zeros(4, 8), atol=1e-5, rtol=0)


def test_rotary_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    rotary = Rotary(head_dim=16, block_size=64, base=10000.0)
    q, k = torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)  # (B, nh, T, hs)
    scores = rotary(q) @ rotary(k).transpose(-2, -1)
    shifted = rotary(q, offset=37) @ rotary(k, offset=37).transpose(-2, -1)  # every position moved by 37
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores, q @ k.transpose(-2, -1), atol=1e-2)  # positions do enter the scores
    torch.testing.assert_close(rotary(q).norm(dim=-1), q.norm(dim=-1))  # a rotation: lengths kept


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = torch.randn(2, 16, 32)
    for qk_norm in (True, False):
        torch.manual_seed(0)
        attn = CausalSelfAttention(config(qk_norm=qk_norm))
        before = attn(x)
        with torch.no_grad():
            attn.c_attn.weight[:64] *= 10  # the query and key rows
        if qk_norm:
            torch.testing.assert_close(attn(x), before, atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(attn(x), before, atol=1e-3)


def test_relu2_mlp_squares_the_relu():
    torch.manual_seed(0)
    mlp = MLP(config(activation="relu2"))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_logit_softcap_bounds_the_logits_smoothly():
    model = tiny(tie_embeddings=False, logit_softcap=5.0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    x = torch.randn(2, 4, 32)
    raw = model.lm_head(x)
    capped = model._logits(x)
    assert raw.abs().max() > 50 and capped.abs().max() <= 5.0  # tanh saturates to 1 in fp32
    torch.testing.assert_close(capped, 5.0 * torch.tanh(raw / 5.0))


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = tiny(zero_init_proj=True)
    x = torch.randn(2, 16, 32)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        torch.testing.assert_close(block(x), x)
    assert tiny(zero_init_proj=True, tie_embeddings=False).lm_head.weight.abs().sum() == 0  # an untied head too
    assert model.lm_head.weight.abs().sum() > 0  # a tied head is the embedding: kept
    assert tiny().transformer.h[0].attn.c_proj.weight.abs().sum() > 0  # GPT-2's init otherwise


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128)])
def test_muon_update_is_close_to_orthogonal(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape)  # a Gaussian matrix: well conditioned unless square
    if shape[0] == shape[1]:
        u, _, vh = torch.linalg.svd(grad)
        grad = u @ torch.diag(torch.linspace(1, 4, shape[0])) @ vh  # condition number 4
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = grad
    # momentum 0 and the original rate adjustment, undone below: the step is -lr * scale * NS(grad)
    Muon([p], lr=1.0, momentum=0.0, weight_decay=0.0).step()
    update = -p.detach() / max(1.0, shape[0] / shape[1]) ** 0.5
    s = torch.linalg.svdvals(update)
    assert 0.5 <= s.min() and s.max() <= 1.3
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    assert F.cosine_similarity(update.flatten(), (u @ vh).flatten(), dim=0) > 0.9


def test_muon_matches_torch_muon_up_to_bfloat16_rounding():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 128))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opts = [Muon([ours], lr=0.02, adjust_lr_fn="match_rms_adamw"), torch.optim.Muon([theirs], lr=0.02, adjust_lr_fn="match_rms_adamw")]
    start = ours.detach().clone()
    for _ in range(3):
        g = torch.randn(64, 128)
        ours.grad, theirs.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    delta_ours, delta_theirs = (ours - start).detach().flatten(), (theirs - start).detach().flatten()
    assert F.cosine_similarity(delta_ours, delta_theirs, dim=0) > 0.99  # torch iterates in bf16, ours in fp32
    assert opts[0].state_dict()["state"][0].keys() == opts[1].state_dict()["state"][0].keys()


def test_build_muon_gives_hidden_matrices_to_muon_and_the_rest_to_adamw():
    model = tiny(**MODERN)
    muon, adamw = build_muon(
        MuonConfig(learning_rate=3e-3, weight_decay=0.0, beta2=0.95, muon_learning_rate=0.02, muon_momentum=0.95, muon_weight_decay=0.0),
        model=model, device_type="cpu",
    )
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon == hidden and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}
    assert id(model.transformer.wte.weight) in in_adamw and id(model.lm_head.weight) in in_adamw


MODERN_RUN = [f"model.{k}={str(v).lower()}" for k, v in MODERN.items()] + [
    "optim=muon",
    "schedule=wsd",
    "schedule.lr_decay_iters=20",  # fixed, so the 10-iteration first half has the same schedule
]


def _losses(run_dir) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["iter"], r["kind"]): r.get("loss", r.get("val_loss")) for r in lines}


@pytest.mark.slow
def test_muon_run_resumes_exactly(train_run, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train_run(*MODERN_RUN, "max_iters=20", run_dir=straight)
    train_run(*MODERN_RUN, "max_iters=10", run_dir=halves)
    train_run(*MODERN_RUN, "max_iters=20", run_dir=halves)  # its checkpoint at 10, Muon's momentum included
    a, b = _losses(straight), _losses(halves)
    common = a.keys() & b.keys()
    assert {(15, "train"), (20, "train"), (20, "eval")} <= common
    assert {key: a[key] for key in common} == {key: b[key] for key in common}
    sa = torch.load(straight / "ckpt.pt", weights_only=True)
    sb = torch.load(halves / "ckpt.pt", weights_only=True)
    assert sa["iter_num"] == sb["iter_num"] == 20
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name


def _measurement_script():
    spec = importlib.util.spec_from_file_location("modern_vs_baseline", ROOT / "scripts" / "modern_vs_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_seed_that_never_reaches_the_target_counts_as_infinitely_late():
    script = _measurement_script()
    # (iteration, val loss, training seconds): seed 2 never gets to 1.886 in its 140 s
    reached, missed, late = (script.Run([(1900, 1.88, 110.0)]), script.Run([(2500, 1.9, 140.0)]),
                             script.Run([(2000, 1.88, 120.0)]))  # fmt: skip
    modern = [script.Run([(350, 1.85, t)]) for t in (29.0, 30.0, 33.0)]
    assert script.median([110.0, None, 120.0]) == 120.0  # one of three missing: still a median
    assert script.median([110.0, None, None]) is None
    table = script.headline({"baseline": [reached, missed, late], "modern": modern}, 1.886)
    assert "| 30.0 |" in table and "| 120.0 |" in table and "25% of the baseline's time" in table
    table = script.headline({"baseline": [reached, missed, missed], "modern": modern}, 1.886)
    # two seeds missing: the median is at least the seeds' training time, the ratio at most
    assert "| > 140.0 |" in table and "less than 21%" in table


@pytest.mark.parametrize("name,flip", _measurement_script().ABLATION)
def test_every_ablation_row_composes_from_the_presets(name, flip):
    config = to_train_config(compose_cfg("experiment=ablation", *flip))
    assert (config.max_iters, config.eval_interval, config.eval_iters, config.system.device) == (400, 50, 20, "cpu")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.block_size) == (4, 4, 128, 64)
    assert config.data.batch_size == 12  # the baseline's batch: only model, optimizer and schedule differ
    for override in flip:  # the row flips what it says, the rest stays the recipe's
        key, value = override.split("=")
        if key in ("optim", "schedule"):
            assert getattr(config, key)._target_.endswith({"adamw": "build_adamw", "cosine": "cosine_schedule"}[value])
        elif key.startswith("model."):
            assert getattr(config.model, key.split(".")[1]) == yaml.safe_load(value)
    if not flip:
        assert {k: getattr(config.model, k) for k in MODERN} == {**MODERN, "norm": "layernorm"}
        assert isinstance(config.optim, MuonConfig) and isinstance(config.schedule, WSDScheduleConfig)
