"""Dropout with masks drawn on all CPU threads: the same Bernoulli dropout as PyTorch's, seeded by
torch's generator, independent of the thread count, and the same attention when nothing drops."""

import pytest
import torch

from nanogpt.dropout import STREAM, Dropout, keep_mask, set_parallel_dropout
from nanogpt.model import GPT, GPTConfig


def test_the_mask_keeps_one_minus_p_of_the_elements():
    torch.manual_seed(0)
    keep = keep_mask((3, STREAM), p=0.2)  # several streams, the last one partial
    assert keep.dtype == torch.bool and keep.shape == (3, STREAM)
    n = keep.numel()
    sd = (0.2 * 0.8 / n) ** 0.5
    assert abs(keep.float().mean().item() - 0.8) < 6 * sd
    # independent elements: neighbours agree as often as two independent draws would
    agree = (keep.flatten()[1:] == keep.flatten()[:-1]).float().mean().item()
    assert abs(agree - (0.8**2 + 0.2**2)) < 0.005


def test_the_mask_is_fixed_by_torch_seed_and_not_by_the_thread_count():
    shape = (5, STREAM // 2 + 7)
    torch.manual_seed(3)
    one_thread, second_draw = keep_mask(shape, 0.1, workers=1), keep_mask(shape, 0.1, workers=1)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(shape, 0.1, workers=2), one_thread)
    assert torch.equal(keep_mask(shape, 0.1, workers=4), second_draw)
    assert not torch.equal(one_thread, second_draw)


def test_parallel_dropout_zeroes_or_scales_and_its_gradient_follows():
    torch.manual_seed(0)
    drop = Dropout(0.25)
    set_parallel_dropout(drop, True)
    x = torch.randn(64, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_parallel_dropout_is_off_unless_asked():
    torch.manual_seed(0)
    a = Dropout(0.5)(torch.ones(1000))
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(torch.ones(1000), 0.5))


@pytest.mark.parametrize("parallel", [False, True])
def test_a_training_step_is_reproducible_from_the_seed(parallel):
    def losses():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
        set_parallel_dropout(model, parallel)
        x = torch.randint(0, 32, (4, 16))
        return [model(x, x)[1].item() for _ in range(3)]

    first = losses()
    assert first == losses()
    assert len(set(first)) == 3  # a new mask each forward


def test_the_parallel_attention_path_is_sdpa_when_nothing_drops():
    """With p so small that no element drops, the hand-written attention equals SDPA's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64, dropout=1e-12))
    x = torch.randint(0, 50, (3, 32))
    reference, _ = model(x, x)
    reference.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    set_parallel_dropout(model, True)
    logits, _ = model(x, x)
    logits.sum().backward()
    assert torch.allclose(logits, reference, atol=1e-5)
    assert all(torch.allclose(p.grad, expected[n], atol=1e-4) for n, p in model.named_parameters())
