"""The sampling engine: cached decoding exact against recomputation, batches and ragged prompts
that change no row's output, top-k/top-p, stop strings, streaming, compilation."""

import io
import subprocess
import sys

import pytest
import torch

import nanogpt.sampling
from conftest import ROOT
from nanogpt.model import GPT, GPTConfig
from nanogpt.sampling import Row, Sampling, Texts, filter_logits, generate
from nanogpt.tokenizer import TiktokenTokenizer

BLOCK = 16
PRESETS = {  # tiny widths of the GPT-2 and modern presets
    "gpt2": GPTConfig(block_size=BLOCK, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True),
    "modern": GPTConfig(block_size=BLOCK, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False, pos_emb="rope",
                        qk_norm=True, activation="relu2", tie_embeddings=False, logit_softcap=15.0),
}


def model(preset: str) -> GPT:
    torch.manual_seed(0)
    return GPT(PRESETS[preset]).eval()


def reference_logits(m: GPT, tokens: list[int]) -> torch.Tensor:
    """The next token's logits as an uncached model sees them: the last block_size tokens."""
    with torch.no_grad():
        return m(torch.tensor([tokens[-BLOCK:]]))[0][0, -1]


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_logits_equal_recomputation_at_every_step_past_block_size(preset, monkeypatch):
    m = model(preset)
    forced = torch.randint(64, (2, 3 * BLOCK), generator=torch.Generator().manual_seed(1)).tolist()
    seen = []

    def teacher(logits, rows, sampling):  # the engine's logits are recorded; the next token is forced
        seen.append([(list(r.tokens), l.clone()) for r, l in zip(rows, logits)])
        return [forced[r.sample][len(r.tokens) - 5] for r in rows]

    monkeypatch.setattr(nanogpt.sampling, "next_tokens", teacher)
    generate(m, [forced[0][:5]], 2, 2 * BLOCK, Sampling())
    assert len(seen) == 2 * BLOCK and max(len(t) for t, _ in seen[-1]) > 2 * BLOCK  # well past the window
    for step in seen:
        for tokens, logits in step:
            torch.testing.assert_close(logits, reference_logits(m, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_decoding_with_and_without_the_cache_agree(preset):
    m = model(preset)
    (row,) = generate(m, [[1, 2, 3]], 1, 2 * BLOCK, Sampling(temperature=0))
    tokens = [1, 2, 3]
    for _ in range(2 * BLOCK):
        logits = reference_logits(m, tokens)
        top2 = logits.topk(2).values
        if top2[0] - top2[1] <= 1e-3:
            break  # a near tie: either token is right
        tokens.append(int(logits.argmax()))
        assert tokens == row.tokens[: len(tokens)]


def test_each_prompt_of_a_ragged_batch_samples_what_it_would_alone():
    m = model("modern")
    prompts = [[1, 2, 3], list(range(5, 14)), list(range(20))]  # the last is longer than block_size
    s = Sampling(temperature=1.0, top_k=20, top_p=0.95, seed=7)
    together = generate(m, prompts, 2, 12, s)
    for p, prompt in enumerate(prompts):
        alone = generate(m, [prompt], 2, 12, s)
        assert [r.tokens for r in together if r.prompt == p] == [r.tokens for r in alone]
    assert together[0].tokens != together[1].tokens  # samples of one prompt differ


def test_top_k_and_top_p_keep_exactly_the_tokens_they_should():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])

    def kept(top_k=None, top_p=None):
        return torch.isfinite(filter_logits(probs.log(), top_k, top_p))[0].nonzero().flatten().tolist()

    assert kept(top_p=0.7) == [0, 1]  # 0.5 < 0.7, 0.75 >= 0.7: the nucleus is the two likeliest
    assert kept(top_p=0.76) == [0, 1, 2]
    assert kept(top_p=1.0) == kept() == [0, 1, 2, 3, 4]
    assert kept(top_k=3) == [0, 1, 2]
    assert kept(top_k=3, top_p=0.6) == [0, 1]  # top-p on what top-k kept: 0.56, 0.28, 0.17
    shuffled = probs[:, [3, 0, 4, 2, 1]].log()  # order does not matter
    assert torch.isfinite(filter_logits(shuffled, None, 0.7))[0].nonzero().flatten().tolist() == [1, 4]


def test_a_stop_string_ends_its_sequence_and_no_other():
    tok = TiktokenTokenizer("gpt2")
    prompt = tok.encode("Q:")
    texts = Texts(tok, [prompt], stop=[" END"])
    rows = [Row(0, j, list(prompt), torch.Generator()) for j in range(2)]
    for row, text in zip(rows, [" one two END three", " one two three"]):
        for t in tok.encode(text):
            row.tokens.append(t)
            if texts.stopped(row):
                break
    assert [texts.text(r) for r in rows] == ["Q: one two", "Q: one two three"]
    assert texts.stopped(rows[0]) and not texts.stopped(rows[1])


@pytest.mark.parametrize("stop", [[], ["🙂"]])
def test_streamed_output_is_the_same_bytes_as_whole_samples(stop):
    tok = TiktokenTokenizer("gpt2")
    prompt = tok.encode("naïve")
    text = " café 🙂 déjà vu 🙂 ünïcödé"  # characters that BPE tokens split
    outputs = []
    for stream in (True, False):
        out = io.StringIO()
        texts = Texts(tok, [prompt], stop, stream=stream, out=out)
        rows = [Row(0, j, list(prompt), torch.Generator()) for j in range(2)]
        for t in tok.encode(text):
            for row in rows:
                row.tokens.append(t)
                row.done = texts.stopped(row)
                texts.on_token(row)
            if rows[0].done:
                break
        rows[0].done = True
        texts.write(rows, "text")
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("naïve café ") and "\ufffd" not in outputs[0]


@pytest.mark.slow
def test_sample_py_streams_the_same_bytes_as_it_prints(tmp_path):
    """A random model with GPT-2's vocabulary emits byte tokens that split characters."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "model_args": vars(m.config), "meta": {"tokenizer": "gpt2"}}, ckpt)
    (tmp_path / "prompt.txt").write_text("héllo")
    out = {}
    for stream in ("true", "false"):
        proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"init_from={ckpt}", "device=cpu", "num_samples=2",
                               "max_new_tokens=40", f"start=FILE:{tmp_path / 'prompt.txt'}", f"stream={stream}"],
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[stream] = proc.stdout
    assert out["true"] == out["false"] and out["true"].startswith("héllo".encode())


def test_a_compiled_decode_step_compiles_once_not_per_token():
    import torch._dynamo

    m = model("gpt2")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(m, backend="eager")  # dynamo's graphs without inductor's code generation
    rows = generate(compiled, [[1, 2, 3]], 2, 10, Sampling(temperature=0))
    assert [r.tokens for r in rows] == [r.tokens for r in generate(m, [[1, 2, 3]], 2, 10, Sampling(temperature=0))]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # prefill and decode, not one per token
