"""Weight-decay groups and the learning-rate schedules."""


import pytest

from nanogpt.model import GPT, GPTConfig
from nanogpt.config import AdamWConfig, CosineScheduleConfig, WSDScheduleConfig
from nanogpt.flops import params
from nanogpt.optim import build_adamw, cosine_schedule, wsd_schedule


def test_cosine_schedule_warmup_peak_decay_floor():
    lr = 1e-3
    f = cosine_schedule(CosineScheduleConfig(decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4), learning_rate=lr)
    assert f(0) * lr == pytest.approx(lr / 101)  # nanoGPT: lr * (it + 1) / (warmup + 1), never 0
    assert f(99) * lr == pytest.approx(lr * 100 / 101)
    assert f(100) * lr == pytest.approx(lr)  # peak at the end of warmup
    mid = 100 + (2000 - 100) // 2
    assert f(mid) * lr == pytest.approx(1e-4 + 0.5 * (lr - 1e-4), rel=1e-3)
    assert f(2000) * lr == pytest.approx(1e-4)
    assert f(5000) * lr == pytest.approx(1e-4)  # the floor after decay
    const = cosine_schedule(CosineScheduleConfig(decay_lr=False, warmup_iters=10, lr_decay_iters=100, min_lr=0.0), learning_rate=lr)
    assert const(50) == const(99) == 1.0


def test_wsd_schedule_is_a_trapezoid():
    f = wsd_schedule(WSDScheduleConfig(warmup_iters=10, lr_decay_iters=100, decay_fraction=0.2, min_lr=0.0), learning_rate=1.0)
    assert f(0) < f(9) < 1 and f(10) == f(50) == f(80) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == 0.0


def test_adamw_decays_only_2d_weights():
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, bias=True))
    (opt,) = build_adamw(AdamWConfig(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95), model=model, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == params(model)  # every parameter once, tied head too
    assert opt.defaults["fused"] is True  # fused AdamW on CPU since PyTorch 2.4
