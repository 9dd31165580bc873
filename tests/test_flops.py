"""FLOPs (nanogpt/flops.py): the structural count against torch's own FLOP counter for every model
preset, the sizes by hand, and a budget's max_iters by hand."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import CONF, TINY, compose_cfg, run_script
from nanogpt.config import build, to_train_config
from nanogpt.errors import UserError
from nanogpt.flops import budget_iters, flops_per_token, params, params_non_embedding
from nanogpt.model import GPT, GPTConfig
from nanogpt.trainer import budgeted

PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
CONTEXT = 64  # a small context: the attention term is counted at the model's block_size


def preset_config(name: str) -> GPTConfig:
    config = to_train_config(compose_cfg(f"model={name}", f"model.block_size={CONTEXT}")).model
    config.vocab_size = config.vocab_size or 65
    return config


@pytest.mark.parametrize("preset", PRESETS)
def test_flops_per_token_is_what_torchs_flop_counter_counts(preset):
    """A forward and backward of each preset, attention on SDPA's math path (the counter does not
    see the fused CPU kernel); presets over 2M parameters on the meta device (shapes only)."""
    config = preset_config(preset)
    with torch.device("meta"):
        device = "cpu" if params(GPT(config)) < 2e6 else "meta"
    with torch.device(device):
        model = GPT(config)
        x = torch.randint(0, config.vocab_size, (2, CONTEXT))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    counted = counter.get_total_flops() / x.numel()
    assert flops_per_token(model) == pytest.approx(counted, rel=0.05)


def test_the_count_is_structural_and_a_tied_head_counts_once():
    """N by hand: 12 n_embd^2 per block (attention 4, MLP 8) plus the head, whether tied to the
    embedding or not; embeddings, biases and norms are not in it."""
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)
    for tied in (True, False):
        model = GPT(GPTConfig(**shape, bias=True, tie_embeddings=tied))
        assert params_non_embedding(model) == 2 * 12 * 32 * 32 + 65 * 32
        assert flops_per_token(model) == 6 * (2 * 12 * 32 * 32 + 65 * 32) + 12 * 2 * 32 * 16
        assert params(model) == sum(p.numel() for p in model.parameters())  # the tied weight once
    # any module: a plain stack of Linear layers with an embedding in front
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    assert params_non_embedding(net) == 8 * 16 + 16 * 10


def test_the_depth_dial_sizes_the_model():
    """model=depth: D layers, width D x aspect_ratio rounded up to a multiple of head_dim; a shape
    key beside depth is one line."""
    m = to_train_config(compose_cfg("model=depth")).model
    assert (m.n_layer, m.n_embd, m.n_head) == (12, 768, 12)  # GPT-2 124M's shape
    with pytest.raises(UserError, match=r"^model.depth=6 sets model.n_head=6, so model.n_head=2 conflicts") as e:
        to_train_config(compose_cfg("model=depth", "model.depth=6", "model.n_head=2"))
    assert "\n" not in str(e.value)

    def shape(**keys):
        m = GPTConfig(**{"n_layer": None, "n_head": None, "n_embd": None, "aspect_ratio": 64, "head_dim": 64, **keys})
        return m.n_layer, m.n_embd, m.n_head

    assert shape(depth=3, aspect_ratio=48) == (3, 192, 3)  # 144 rounded up to 192
    assert shape(depth=5, head_dim=32) == (5, 320, 10)
    assert shape(depth=4, n_layer=4) == (4, 256, 4)  # agreeing with depth is no conflict
    for key, value in (("n_layer", 12), ("n_embd", 128)):
        with pytest.raises(ValueError, match=f"model.depth=4 sets model.{key}=.*conflicts"):
            shape(depth=4, **{key: value})
    with pytest.raises(ValueError, match="model.depth needs model.aspect_ratio"):
        GPTConfig(depth=4, n_layer=None, n_head=None, n_embd=None)
    # a checkpoint's model_args (the derived shape beside depth) build the same model
    assert GPTConfig(**vars(GPTConfig(depth=3, n_layer=None, n_head=None, n_embd=None, aspect_ratio=64,
                                      head_dim=64))).n_embd == 192


def test_a_budget_sets_max_iters(tiny_config):
    """tokens_per_param and flops_budget give max_iters by hand arithmetic, and the schedule ends
    with the run; too small a budget names the smallest that works."""
    n = 2 * 12 * 32 * 32 + 65 * 32  # model=tiny on Tiny Shakespeare: 2 layers, 32 wide, 65 characters
    flops = 6 * n + 12 * 2 * 32 * 32  # per token, block 32
    tokens = 4 * 32  # per iteration: batch 4 x block 32
    config = budgeted(tiny_config("tokens_per_param=20", "schedule.warmup_fraction=0.1"), overrides=[])
    assert config.max_iters == round(20 * n / tokens) == config.schedule.lr_decay_iters == 4165
    lr_scale = build(config.schedule, learning_rate=config.optim.learning_rate)  # warmup: 10% of the run, 416 steps
    floor = config.schedule.min_lr / config.optim.learning_rate
    assert (lr_scale(415), lr_scale(416), lr_scale(4165)) == pytest.approx((416 / 417, 1.0, floor))
    config = budgeted(tiny_config("flops_budget=3e10"), overrides=[])
    assert config.max_iters == round(3e10 / (flops * tokens)) == 1270
    assert flops * tokens == 23_617_536  # an iteration's FLOPs: 2.37e7 rounded up
    with pytest.raises(UserError, match=r"the smallest budget that works is flops_budget=2\.37e\+07$"):
        budget_iters(params_non_embedding=n, flops_per_token=flops, tokens_per_iter=tokens, flops_budget=2.3e7)
    for iters, expected in ((2.4, 2), (2.6, 3)):  # rounded to the nearest
        assert budget_iters(params_non_embedding=n, flops_per_token=flops, tokens_per_iter=tokens,
                            tokens_per_param=iters * tokens / n) == expected


@pytest.mark.slow
def test_a_wrong_budget_is_one_line_before_any_work(tmp_path, data_root):
    """Both budgets, a budget beside an explicit max_iters=, a budget short of one iteration: exit 2
    with one line, and the run folder holds only .hydra."""
    cases = [
        (["tokens_per_param=20", "flops_budget=1e12"], "tokens_per_param and flops_budget both set the run's length"),
        (["flops_budget=1e12", "max_iters=20"], "flops_budget=1e+12 sets max_iters: drop max_iters=20"),
        (["tokens_per_param=1e-3"], "the smallest budget that works is tokens_per_param=0.00481"),  # 128 / 26,656
    ]
    tiny = [o for o in TINY if not o.startswith("max_iters=")]
    with ThreadPoolExecutor(len(cases)) as pool:  # three processes at once: most of each is start-up
        procs = pool.map(lambda i: run_script("train.py", *tiny, f"data.root={data_root}", *cases[i][0],
                                              f"hydra.run.dir={tmp_path / f'run{i}'}", cwd=tmp_path, check=False),
                         range(len(cases)))
    for i, proc in enumerate(procs):
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert cases[i][1] in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
        assert sorted(p.name for p in (tmp_path / f"run{i}").iterdir()) == [".hydra"]
    # a budget sizes a run from scratch: not one that starts from other weights
    with pytest.raises(UserError, match="tokens_per_param sizes a run trained from scratch, not from init_from=gpt2"):
        budgeted(to_train_config(compose_cfg(*TINY, "tokens_per_param=20", "init_from=gpt2")), overrides=[])
