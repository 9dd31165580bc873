"""The GPT module: shapes, weight tying, GPT-2's parameter count, cropping, generation."""

import pytest
import torch

from nanogpt.flops import params
from nanogpt.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **kw))


def test_forward_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None  # inference: last position only


def test_weight_tying():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_gpt2_small_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True))
    # as Hugging Face counts GPT-2: tied head once, position embeddings included
    assert params(model) == 124_439_808


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=8, n_head=4, n_embd=256))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.1)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_crop_block_size_keeps_logits_on_a_prefix():
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 8))
    before, _ = model(idx, idx)
    model.crop_block_size(8)
    after, _ = model(idx, idx)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape[0] == 8
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError):
        model(torch.randint(0, 50, (1, 9)))


def test_generate_extends_and_respects_top_k():
    from nanogpt.sampling import Sampling, generate

    model = tiny().eval()
    rows = generate(model, [[0, 0, 0]], 2, 20, Sampling(temperature=1.0, top_k=1))
    assert [len(r.tokens) for r in rows] == [23, 23]
    assert rows[0].tokens == rows[1].tokens  # top_k=1 is greedy: same prompt, same text


def test_invalid_head_count_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_a_packed_window_gives_each_document_the_logits_it_gets_alone(pos_emb):
    """model.doc_mask: with each token's place in its document, attention stays inside documents
    and positions restart at each, so a window of several documents is each of them run alone."""
    model = tiny(pos_emb=pos_emb, doc_mask=True).eval()
    lengths = [[5, 9, 2], [16], [1, 7, 8]]
    idx = torch.randint(0, 50, (3, 16))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    logits, _ = model(idx, idx, positions=positions)
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            alone, _ = model(idx[b : b + 1, at : at + n], idx[b : b + 1, at : at + n])
            torch.testing.assert_close(logits[b, at : at + n], alone[0], atol=1e-5, rtol=0)
            at += n
    # without positions, a window is one document, as before
    assert not torch.allclose(model(idx, idx)[0][0, 5:14], logits[0, 5:14], atol=1e-3)
