"""The model protocol and the builders' contract: GPT meets the protocol, its parameter groups are
GPT-2's decay split, a group's rate scale reaches every optimizer (nanogpt's and a user's), and
what a model or a builder lacks is one line."""

import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from nanogpt.config import AdamWConfig, MuonConfig, build
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import build_adamw, build_muon, set_lr, torch_groups
from nanogpt.protocol import LanguageModel, ParamGroup, as_optimizers, check_builder, check_model, default_param_groups

sys.path.insert(0, str(ROOT / "examples" / "own_code"))  # the example package, for its Lion and SwiGLU GPT
from myresearch.model import SwiGLUConfig, SwiGLUGPT  # noqa: E402
from myresearch.optim import Lion, LionConfig, build_lion  # noqa: E402


def tiny(cls=GPT, config=GPTConfig, **kw):
    torch.manual_seed(0)
    return cls(config(**{**dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, bias=True), **kw}))


def test_gpt_is_the_reference_implementation_of_the_protocol():
    model = tiny()
    assert isinstance(model, LanguageModel) and model.blocks is model.transformer.h
    check_model(model, "nanogpt.model.GPT")  # raises nothing
    assert GPTConfig()._target_ == "nanogpt.model.GPT"


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_parameter_groups_are_gpt2s_decay_split(tied):
    model = tiny(tie_embeddings=tied)
    groups = {g.kind: g for g in model.param_groups()}
    names = {id(p): n for n, p in model.named_parameters()}
    kind = {names[id(p)]: g.kind for g in groups.values() for p in g.params}
    assert kind == {n: ("vector" if p.dim() < 2 else "embedding" if n.startswith(("transformer.wte", "transformer.wpe"))
                        else "hidden" if n.startswith("transformer.h.") else "head") for n, p in model.named_parameters()}
    assert ("head" in groups) == (not tied)  # a tied head is the token embedding, counted once
    assert groups["vector"].weight_decay_scale == 0 and all(g.weight_decay_scale == 1 for k, g in groups.items() if k != "vector")
    # AdamW's torch groups: nanoGPT's configure_optimizers, the same parameters in the same order
    decay, no_decay = torch_groups(model, model.param_groups(), 1e-3, 0.1)
    assert [names[id(p)] for p in decay["params"]] == [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert [names[id(p)] for p in no_decay["params"]] == [n for n, p in model.named_parameters() if p.dim() < 2]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


class ScaledGPT(GPT):
    """A parametrization of one's own (muP-like): hidden matrices at half the rate, decayed twice as hard."""

    def param_groups(self):
        return [dataclasses.replace(g, lr_scale=0.5, weight_decay_scale=2.0) if g.kind == "hidden" else g
                for g in super().param_groups()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "lion"])
def test_a_groups_rate_scale_reaches_every_optimizer_and_survives_the_schedule(optimizer):
    model = tiny(ScaledGPT)
    hidden = {id(p) for g in model.param_groups() if g.kind == "hidden" for p in g.params}
    built = {
        "adamw": lambda: build_adamw(AdamWConfig(learning_rate=1e-3, weight_decay=0.1), model=model, device_type="cpu"),
        "muon": lambda: build_muon(MuonConfig(learning_rate=1e-3, weight_decay=0.1, muon_learning_rate=4e-3,
                                              muon_weight_decay=0.2), model=model, device_type="cpu"),
        "lion": lambda: build_lion(LionConfig(learning_rate=1e-3, weight_decay=0.1), model=model, device_type="cpu"),
    }[optimizer]
    optimizers = as_optimizers(built(), optimizer)
    set_lr(optimizers, 1.0)
    set_lr(optimizers, 0.3)  # a schedule's multiplier of each group's own peak
    seen = set()
    for opt in optimizers:
        base_lr, base_wd = (4e-3, 0.2) if isinstance(opt, torch.optim.Muon) else (1e-3, 0.1)
        for g in opt.param_groups:
            for p in g["params"]:
                scaled = id(p) in hidden
                decayed = p.dim() >= 2
                assert g["lr"] == pytest.approx(0.3 * base_lr * (0.5 if scaled else 1.0))
                assert g["weight_decay"] == pytest.approx(base_wd * (2.0 if scaled else 1.0 if decayed else 0.0))
                seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}


def test_lion_steps_as_its_paper_writes_it():
    """Chen et al. 2023, Algorithm 2, by hand in numpy: c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p);
    m = b2 m + (1 - b2) g."""
    rng = np.random.default_rng(0)
    p0, grads = rng.normal(size=(4, 3)), rng.normal(size=(3, 4, 3))
    lr, wd, b1, b2 = 1e-2, 0.5, 0.9, 0.99
    param = nn.Parameter(torch.tensor(p0))
    opt = Lion([param], lr=lr, betas=(b1, b2), weight_decay=wd)
    p, m = p0.copy(), np.zeros_like(p0)
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step()
        p = p - lr * (np.sign(b1 * m + (1 - b1) * g) + wd * p)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(param.detach().numpy(), p, rtol=1e-12, atol=1e-12)


def test_a_user_model_extending_gpt_keeps_the_protocol():
    model = tiny(SwiGLUGPT, SwiGLUConfig, hidden_multiple=8)
    check_model(model, "myresearch.model.SwiGLUGPT")
    hidden = 8 * math.ceil(8 * 16 / 3 / 8)
    assert model.blocks[0].mlp.c_fc.weight.shape == (2 * hidden, 16)
    hidden_params = {id(p) for g in model.param_groups() if g.kind == "hidden" for p in g.params}
    assert id(model.blocks[1].mlp.c_proj.weight) in hidden_params  # the new MLP's weights are the blocks'
    _, loss = model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    loss.backward()
    assert model.blocks[0].mlp.c_fc.weight.grad is not None


@dataclasses.dataclass
class BareConfig:
    _target_: str = "test_protocol.Bare"
    block_size: int = 8
    vocab_size: int | None = 32


class Bare(nn.Module):
    """A model that forgot most of the protocol."""

    def __init__(self, config: BareConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, idx):
        return idx


def test_what_a_model_lacks_of_the_protocol_is_one_line_naming_it():
    with pytest.raises(UserError) as e:
        check_model(Bare(BareConfig()), "test_protocol.Bare")
    message = str(e.value)
    assert "\n" not in message and message.startswith("model._target_=test_protocol.Bare lacks ")
    for missing in ("config.n_layer", "blocks", "forward(idx, targets=None, cache=None)", "param_groups()"):
        assert missing in message, message


def test_default_param_groups_serve_a_model_of_ones_own():
    class Mini(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.blocks, self.out = nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4)]), nn.Linear(4, 8)

    m = Mini()
    groups = {g.kind: [id(p) for p in g.params] for g in default_param_groups(m)}
    assert groups == {"embedding": [id(m.emb.weight)], "hidden": [id(m.blocks[0].weight)],
                      "vector": [id(m.blocks[0].bias), id(m.out.bias)], "head": [id(m.out.weight)]}
    with pytest.raises(ValueError, match="kind 'matrix'"):
        ParamGroup([], "matrix")


@pytest.mark.parametrize("key,builder,wanted", [
    ("schedule", print, "(option, *, learning_rate)"),
    ("optim", lambda c: None, "(option, *, model, device_type)"),
    ("eval.tasks.mine", dict, "(option, *, name, cache_dir)"),
])
def test_a_builder_that_cannot_take_its_arguments_is_one_line(key, builder, wanted):
    with pytest.raises(UserError, match=f"does not take a {key.split('.')[0]} builder's arguments") as e:
        check_builder(builder, key, "some.target")
    assert wanted in str(e.value)
    check_builder(build_adamw, "optim", "nanogpt.optim.build_adamw")  # nanogpt's own take theirs


def test_an_optimizer_builder_returns_one_optimizer_or_a_list():
    model = tiny()
    (one,) = as_optimizers(torch.optim.SGD(model.parameters(), lr=0.1), "x.sgd")
    assert isinstance(one, torch.optim.SGD)
    with pytest.raises(UserError, match="returned dict, not a torch.optim.Optimizer"):
        as_optimizers({"lr": 1}, "x.sgd")
    assert isinstance(build(GPTConfig(vocab_size=32, n_layer=1, n_head=1, n_embd=8, block_size=4)), GPT)
